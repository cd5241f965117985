"""Sharded checkpoints (hvdkit.sharded_checkpoint, CheckpointStore with shards, hvdkit checkpoint merge): plain numpy
arrays standing in for three ranks' optimizer shards, no framework and no launch. The frameworks' shards, written by
2 launched workers and merged into plain models, are in test_zero_torch.py and test_zero_keras.py."""
import json
import os
import re

import numpy as np
import pytest

from hvdkit.checkpoint import CheckpointStore
from hvdkit.cli import main
from hvdkit.errors import HvdkitError
from hvdkit.sharded_checkpoint import assemble, shard_file, write_shard
from hvdkit.zero import FlatLayout

SHAPES = [(3, 4), (5,), (2, 2)]   # 21 elements: at 3 ranks, shards of 7 (no padding) cut the first tensor


def unsharded(seed):
    rng = np.random.default_rng(seed)
    return {f"{i}/m": rng.normal(size=shape).astype(np.float32) for i, shape in enumerate(SHAPES)}


def save_sharded(store, world, seed, extra_padding=False):
    """What every rank and then rank 0 do at a sharded commit (hvdkit.trainer.Trainer.commit_static)."""
    full = unsharded(seed)
    layout = FlatLayout([int(np.prod(s)) for s in SHAPES], world)
    flat = np.zeros(layout.padded, np.float32)
    for i, at in enumerate(layout.offsets):
        flat[at:at + full[f"{i}/m"].size] = full[f"{i}/m"].ravel()
    index = {"world": world, "flats": {"m": layout.padded},
             "assemble": [{"key": f"{i}/m", "flat": "m", "offset": at, "shape": list(SHAPES[i])}
                          for i, at in enumerate(layout.offsets)]}
    number = store.next_number()
    entries = [write_shard(store.directory, number, r, world, {"m": flat[slice(*layout.shard_range(r))]})
               for r in range(world)]
    path = store.save(f"rank 0's part {seed}".encode(), {"epoch": seed, "framework": "fake"}, shards=entries,
                      shard_index=index, number=number)
    return path, full


def merge_into_json(blob, arrays):
    return json.dumps({"blob": blob.decode(), **{k: v.tolist() for k, v in arrays.items()}}).encode()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_reassemble_into_the_unsharded_arrays(tmp_path, world):
    store = CheckpointStore(str(tmp_path), merge=merge_into_json)
    _, full = save_sharded(store, world, seed=world)
    assert sorted(f for f in os.listdir(tmp_path) if ".shard-" in f) == [shard_file(0, r, world) for r in range(world)]
    blob, manifest = store.load_latest()
    merged = json.loads(blob)
    assert merged["blob"] == f"rank 0's part {world}" and manifest["shard_index"]["world"] == world
    for key, value in full.items():
        assert np.array_equal(np.asarray(merged[key], np.float32), value)


def test_a_damaged_shard_falls_back_to_the_previous_checkpoint_naming_the_file(tmp_path):
    said = []
    store = CheckpointStore(str(tmp_path), keep=5, log=said.append, merge=merge_into_json)
    save_sharded(store, 3, seed=1)
    save_sharded(store, 3, seed=2)
    damaged = tmp_path / shard_file(1, 1, 3)
    data = bytearray(damaged.read_bytes())
    data[-20] ^= 0xFF                                  # same size, one bit pattern changed
    damaged.write_bytes(bytes(data))
    blob, manifest = store.load_latest()
    assert json.loads(blob)["blob"] == "rank 0's part 1"   # the older one, whole
    assert len(said) == 1 and str(damaged) in said[0] and "corrupt" in said[0]
    os.unlink(tmp_path / shard_file(0, 2, 3))          # the older one loses a shard too: nothing usable is left
    with pytest.raises(HvdkitError, match=rf"no usable checkpoint .*{shard_file(1, 1, 3)}.* nothing was changed"):
        store.load_latest()


def test_a_shard_another_host_wrote_elsewhere_stops_the_index_with_one_line(tmp_path):
    store = CheckpointStore(str(tmp_path))
    layout = FlatLayout([8], 2)
    entries = [write_shard(str(tmp_path), 0, r, 2, {"m": np.ones(layout.shard_size, np.float32)}) for r in range(2)]
    os.unlink(tmp_path / entries[1]["file"])           # written on rank 1's own disk, not here
    with pytest.raises(HvdkitError, match=r"rank 1 wrote its optimizer shard .* not shared between the hosts; pass "
                                          r"a --checkpoint-dir on a shared filesystem"):
        store.save(b"x", {}, shards=entries, shard_index={"world": 2, "flats": {"m": 8}, "assemble": []}, number=0)
    assert store.numbers() == []                        # no index: no checkpoint


def test_old_checkpoints_and_orphaned_shards_are_removed(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2, merge=merge_into_json)
    for seed in range(3):
        save_sharded(store, 2, seed)
    write_shard(str(tmp_path), 7, 0, 2, {"m": np.zeros(4, np.float32)})   # a save cut short before its index
    save_sharded(store, 2, 3)
    names = sorted(os.listdir(tmp_path))
    assert names == sorted([f"ckpt-{n:08d}.{e}" for n in (2, 3) for e in ("bin", "json")] +
                           [shard_file(n, r, 2) for n in (2, 3) for r in range(2)])


def test_a_sharded_checkpoint_without_a_merger_says_how_to_read_it(tmp_path):
    save_sharded(CheckpointStore(str(tmp_path)), 2, seed=0)
    with pytest.raises(HvdkitError, match=r"is sharded .* `hvdkit checkpoint merge`"):
        CheckpointStore(str(tmp_path)).verify(0)


def test_a_malformed_index_is_refused(tmp_path):
    store = CheckpointStore(str(tmp_path), merge=merge_into_json)
    save_sharded(store, 2, seed=0)
    manifest_path = tmp_path / "ckpt-00000000.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"] = manifest["shards"][:1]         # rank 1's entry lost
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(HvdkitError, match="malformed shard index"):
        assemble(str(tmp_path), manifest)


@pytest.mark.parametrize("args, problem", [
    (["{src}", "{dst}"], r"no checkpoint in .*; pass the --checkpoint-dir of a run"),
    (["{full}", "{dst}"], r"is not sharded: it is one file already"),
    (["{full}", "{dst}", "--number", "5"], r"no checkpoint 5 in .* \(there are 0\); pass one of those"),
    (["{full}", "{full}"], r"the destination is the source directory"),
])
def test_merge_command_bad_input_is_one_line(tmp_path, capsys, args, problem):
    CheckpointStore(str(tmp_path / "full")).save(b"x", {"framework": "torch"})
    (tmp_path / "src").mkdir()
    paths = {"src": tmp_path / "src", "dst": tmp_path / "dst", "full": tmp_path / "full"}
    code = main(["checkpoint", "merge"] + [a.format(**paths) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("hvdkit: error: ")
    assert re.search(problem, err), err
    assert not (tmp_path / "dst").exists()
