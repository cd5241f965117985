"""Sharded optimizer (ZeRO stage 2, ``shard_optimizer``) for torch.

The shard arithmetic (hvdkit/zero.py) in pure Python; in one process (``LocalProcess``) sharded runs against
unsharded ones (parameters and the unsharded optimizer state dict), checkpoints across the two, a rollback, the
refusals; one launch at 2 and one at 3 workers (tests/workers/zero_checks.py): sharded == unsharded on every
rank (also with fp16 compression of the reduce-scatter), per-rank optimizer state ~1/N, and a sharded checkpoint
written at 2 workers resumed at 3 and at 1 reaching the parameters of an uninterrupted run.
"""
import json
import random
import shutil
import sys

import numpy as np
import pytest

from hvdkit import HvdkitError, TrainConfig, Trainer
from hvdkit.cli import main
from hvdkit.zero import FlatLayout, padded_length

from fault_callbacks import RaiseOnce
from proc import WORKERS, explain, launch

sys.path.insert(0, WORKERS)


# ---- shard arithmetic ------------------------------------------------------------------------------------
@pytest.mark.parametrize("total,world,padded", [(0, 1, 1), (0, 3, 3), (1, 3, 3), (10, 3, 12), (12, 3, 12),
                                                (153, 2, 154), (153, 3, 153), (7, 1, 7)])
def test_padding_gives_every_rank_the_same_length(total, world, padded):
    assert padded_length(total, world) == padded
    layout = FlatLayout([total], world)
    assert layout.shard_size * world == padded
    assert [layout.shard_range(r) for r in range(world)] == [(r * layout.shard_size, (r + 1) * layout.shard_size)
                                                             for r in range(world)]


def test_a_tensor_larger_than_a_shard_is_split_over_ranks():
    layout = FlatLayout([3, 10, 2], world=3)   # 15 elements, shards of 5: tensor 1 spans elements 3..12
    assert layout.owners(1) == [0, 1, 2] and layout.owners(0) == [0] and layout.owners(2) == [2]
    assert [(p.index, p.start, p.stop, p.offset) for p in layout.pieces(0)] == [(0, 0, 3, 0), (1, 0, 2, 3)]
    assert [(p.index, p.start, p.stop, p.offset) for p in layout.pieces(1)] == [(1, 2, 7, 0)]
    assert [(p.index, p.start, p.stop, p.offset) for p in layout.pieces(2)] == [(1, 7, 10, 0), (2, 0, 2, 3)]


def test_every_element_is_in_exactly_one_shard_and_padding_only_at_the_end():
    rng = random.Random(4)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 2, 3, 7, 16, 80]) for _ in range(rng.randint(0, 7))]
        world = rng.randint(1, 6)
        layout = FlatLayout(sizes, world)
        seen = [np.zeros(s, dtype=int) for s in sizes]
        held = []
        for rank in range(world):
            positions = np.zeros(layout.shard_size, dtype=int)
            for p in layout.pieces(rank):
                assert 0 <= p.start < p.stop <= sizes[p.index] and p.offset + p.length <= layout.shard_size
                seen[p.index][p.start:p.stop] += 1
                positions[p.offset:p.offset + p.length] += 1
                # where it lands in the flat vector is where the tensor's element lies
                assert layout.shard_range(rank)[0] + p.offset == layout.offsets[p.index] + p.start
            assert positions.max(initial=0) <= 1
            held.append(positions)
        assert all((s == 1).all() for s in seen), (sizes, world)
        covered = np.concatenate(held)
        assert covered[:layout.total].all() and not covered[layout.total:].any()
        assert layout.padded - layout.total < world or layout.total == 0   # an empty group: one zero per rank


def test_bad_layouts_are_refused():
    with pytest.raises(HvdkitError, match="world >= 1"):
        FlatLayout([3], 0)
    with pytest.raises(HvdkitError, match="sizes must be >= 0"):
        FlatLayout([3, -1], 2)
    with pytest.raises(HvdkitError, match="outside a world of 2"):
        FlatLayout([3], 2).pieces(2)


# ---- one process -------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from hvdkit.torch import LocalProcess, TorchAdapter  # noqa: E402
import zero_checks as zc  # noqa: E402

FEATURES = {"plain": dict(batch_size=4),
            "accumulation_clip_schedule": dict(batch_size=4, accumulation=2, clip_grad_norm=0.3, scheduler=True),
            "bf16": dict(batch_size=4, precision="bf16", clip_grad_norm=0.3)}


def local_fit(name, shard, **config):
    return zc.fit(name, shard, process=LocalProcess(), **config)


@pytest.mark.parametrize("features", sorted(FEATURES))
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_sharded_equals_unsharded_in_one_process(name, features):
    plain_net, plain, _ = local_fit(name, False, **FEATURES[features])
    sharded_net, sharded, result = local_fit(name, True, **FEATURES[features])
    assert result.global_step == zc.steps(1, **FEATURES[features])
    assert np.abs(zc.flat(plain_net) - zc.flat(sharded_net)).max() <= 1e-6
    assert np.abs(zc.flat(plain_net) - zc.flat(zc.model())).max() > 1e-2   # it trained
    # the unsharded view of the sharded state is the unsharded optimizer's state dict
    sharded.gather_state()
    want, got = plain.optimizer.state_dict(), sharded._optimizer_state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"]) and got["state"]
    for index, entry in want["state"].items():
        assert sorted(got["state"][index]) == sorted(entry)
        for key, value in entry.items():
            assert got["state"][index][key].shape == value.shape
            assert torch.allclose(got["state"][index][key], value, rtol=1e-4, atol=1e-6), (index, key)
    assert result.optimizer_state_bytes == sharded.optimizer_state_bytes() > 0
    assert all(p.grad is None for p in sharded_net.parameters())   # stage 2: the full gradients are not kept


OTHER_OPTIMIZERS = {
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05, lr_decay=0.01, weight_decay=1e-3),
    "rmsprop_centered": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5, centered=True),
    "adamax": lambda params: torch.optim.Adamax(params, lr=0.02),
    "nadam": lambda params: torch.optim.NAdam(params, lr=0.02, decoupled_weight_decay=True, weight_decay=0.01),
    "radam": lambda params: torch.optim.RAdam(params, lr=0.02),
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=0.02, amsgrad=True)}


@pytest.mark.parametrize("name", sorted(OTHER_OPTIMIZERS))
def test_every_elementwise_optimizer_shards_alike(name):
    make = OTHER_OPTIMIZERS[name]
    finals = []
    for shard in (False, True):
        net = zc.model()
        Trainer(TorchAdapter(net, make(net.parameters()), torch.nn.functional.cross_entropy),
                TrainConfig(**dict(zc.QUIET, batch_size=4), shard_optimizer=shard),
                process=LocalProcess()).fit(zc.data())
        finals.append(zc.flat(net))
    # the shards step with torch's foreach kernels, the unsharded run with its single-tensor ones: they round apart
    assert np.abs(finals[0] - finals[1]).max() <= 1e-5
    assert np.abs(finals[0] - zc.flat(zc.model())).max() > 1e-3


def test_a_skipped_nonfinite_step_is_skipped_alike():
    calls = {"n": 0}

    def loss_nan_at_third_call(outputs, targets):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        return loss * float("nan") if calls["n"] == 3 else loss

    finals = []
    for shard in (False, True):
        calls["n"] = 0
        net = zc.model()
        adapter = TorchAdapter(net, zc.optimizer_for("adam", net), loss_nan_at_third_call)
        result = Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4), nonfinite="skip", shard_optimizer=shard),
                         process=LocalProcess()).fit(zc.data())
        assert result.skipped_steps == 1
        finals.append(zc.flat(net))
    assert np.abs(finals[0] - finals[1]).max() <= 1e-6


@pytest.mark.parametrize("first,second", [(True, True), (True, False), (False, True)])
def test_a_second_fit_keeps_the_optimizer_state_sharded_or_not(first, second):
    """Two fits of one adapter, each sharded or not: the second steps from the first's Adam state (a sharded fit
    before an unsharded one used to drop it: the user's optimizer holds none while sharded)."""
    def two_fits(first, second, fresh_state=False):
        net = zc.model()
        adapter = TorchAdapter(net, zc.optimizer_for("adam", net), torch.nn.functional.cross_entropy)
        for i, shard in enumerate((first, second)):
            if fresh_state and i == 1:   # what dropping the state did: the second fit on a fresh Adam
                adapter = TorchAdapter(net, zc.optimizer_for("adam", net), torch.nn.functional.cross_entropy)
            Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4), shard_optimizer=shard),
                    process=LocalProcess()).fit(zc.data())
        return zc.flat(net)
    reference = two_fits(False, False)
    assert np.abs(two_fits(False, False, fresh_state=True) - reference).max() > 1e-3   # the state matters here
    assert np.abs(two_fits(first, second) - reference).max() <= 1e-5


def uninterrupted_reference():
    """The checkpoint scenario's run, unsharded and in one go, at one worker on the same global batch."""
    net, _, result = zc.fit("adam", False, process=LocalProcess(), batchnorm=False, lr_scaling="none",
                            batch_size=zc.GLOBAL_BATCH)
    assert result.global_step == zc.steps(1, zc.GLOBAL_BATCH)
    return zc.flat(net)


def resume_run(directory, shard, stop=False):
    return zc.fit("adam", shard, process=LocalProcess(), batchnorm=False, lr_scaling="none",
                  batch_size=zc.GLOBAL_BATCH, checkpoint_dir=str(directory),
                  stop_after_steps=zc.STOP_AT if stop else None)


@pytest.mark.parametrize("written,resumed", [(True, False), (False, True), (True, True)])
def test_checkpoints_cross_between_sharded_and_unsharded(tmp_path, written, resumed):
    stopped_net, _, stopped = resume_run(tmp_path, written, stop=True)
    assert stopped.global_step == zc.STOP_AT
    net, _, result = resume_run(tmp_path, resumed)
    assert result.resumed_from["global_step"] == zc.STOP_AT and result.global_step == zc.steps(1, zc.GLOBAL_BATCH)
    assert np.abs(zc.flat(net) - uninterrupted_reference()).max() <= 1e-6


def test_a_rollback_restores_the_sharded_state(tmp_path):
    from horovod.common.exceptions import HorovodInternalError
    whole, _, _ = local_fit("adam", True, batch_size=4)
    crash = RaiseOnce(at=9, error=HorovodInternalError("peer lost (simulated)"))
    net = zc.model()
    adapter = TorchAdapter(net, zc.optimizer_for("adam", net), torch.nn.functional.cross_entropy)
    result = Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4), shard_optimizer=True, elastic=True,
                                          commit_every=4, checkpoint_dir=str(tmp_path)),
                     [crash], process=LocalProcess()).fit(zc.data())
    assert crash.fired and result.resets == 1 and result.global_step == zc.steps(1, 4)
    assert np.abs(zc.flat(net) - zc.flat(whole)).max() == 0.0


def test_best_checkpoints_are_sharded_and_merge_into_the_unsharded_runs(tmp_path):
    """keep_best with a sharded optimizer: the best checkpoints are written as shards (nothing gathered), each
    merges (hvdkit checkpoint merge) into the same blob an unsharded run keeps as its best, to 1e-6."""
    import glob
    from hvdkit.checkpoint import BestStore
    from hvdkit.merge import merge_checkpoint
    kept = {}
    for shard in (True, False):
        directory = tmp_path / ("sharded" if shard else "plain")
        _, _, result = local_fit("adam", shard, batch_size=4, keep_best=2, monitor="loss", checkpoint_dir=str(directory))
        best = BestStore(str(directory / "best"), keep=2)
        assert result.best is not None and len(best.numbers()) == 2
        kept[shard] = [(value, epoch, number) for value, epoch, number, _ in best.ranked()]
        shards = glob.glob(str(directory / "best" / "*.shard-*"))
        assert len(shards) == (2 if shard else 0), shards   # one shard per kept checkpoint (1 worker)
    assert [e for _, e, _ in kept[True]] == [e for _, e, _ in kept[False]]   # the same epochs ranked the same
    for (_, epoch, sharded_number), (_, _, plain_number) in zip(kept[True], kept[False]):
        said = merge_checkpoint(str(tmp_path / "sharded" / "best"), str(tmp_path / f"merged-{epoch}"),
                                number=sharded_number)
        merged = str(tmp_path / f"merged-{epoch}" / "ckpt-00000000.bin")
        assert said.endswith(f"into {merged}"), said
        nets = []
        for path in (merged, str(tmp_path / "plain" / "best" / f"ckpt-{plain_number:08d}.bin")):
            net = zc.model()
            plain = TorchAdapter(net, zc.optimizer_for("adam", net), torch.nn.functional.cross_entropy)
            with open(path, "rb") as f:
                plain.state_from_bytes(f.read())   # an unsharded optimizer loads it as it is
            nets.append((net, plain.optimizer))
        (a, opt_a), (b, opt_b) = nets
        assert np.abs(zc.flat(a) - zc.flat(b)).max() <= 1e-6
        for pa, pb in zip(a.parameters(), b.parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                assert float((opt_a.state[pa][key] - opt_b.state[pb][key]).abs().max()) <= 1e-6, (epoch, key)
            assert float(opt_a.state[pa]["step"]) == float(opt_b.state[pb]["step"]) > 0


def test_misuse_is_refused_in_one_line():
    net = zc.model()
    loss = torch.nn.functional.cross_entropy

    def fit(optimizer, model=net, **adapter):
        Trainer(TorchAdapter(model, optimizer, loss, **adapter),
                TrainConfig(**dict(zc.QUIET, batch_size=4), shard_optimizer=True), process=LocalProcess()).fit(zc.data())
    with pytest.raises(HvdkitError, match="shard_optimizer must be True or False"):
        TrainConfig(shard_optimizer="yes").validate()
    with pytest.raises(HvdkitError, match="needs op='average'"):
        fit(zc.optimizer_for("adam", net), op="adasum")
    with pytest.raises(HvdkitError, match="elementwise .* not LBFGS: .*per-tensor"):
        fit(torch.optim.LBFGS(net.parameters()))
    sparse = torch.nn.Sequential(torch.nn.Embedding(4, 3, sparse=True))
    with pytest.raises(HvdkitError, match=r"sparse gradients \(0 has sparse=True\)"):
        fit(torch.optim.SGD(sparse.parameters(), lr=0.1), model=sparse)


def test_the_flag_and_the_metrics_file(tmp_path):
    from hvdkit.scripting import config_from_args, training_parser, write_metrics
    parser = training_parser("t", epochs=1, batch_size=4, lr=0.1)
    assert config_from_args(parser.parse_args(["--shard-optimizer"])).shard_optimizer is True
    assert config_from_args(parser.parse_args([])).shard_optimizer is False
    _, adapter, result = local_fit("adam", True, batch_size=4)
    metrics = write_metrics(str(tmp_path / "m.json"), result, "torch", 0)
    assert json.loads((tmp_path / "m.json").read_text())["optimizer_state_bytes"] == metrics["optimizer_state_bytes"]
    assert metrics["optimizer_state_bytes"] == adapter.optimizer_state_bytes() > 0


# ---- launched: 2 and 3 workers -----------------------------------------------------------------------------
def run_workers(out, np_, checkpoint_dir, resume_dir=None):
    args = [str(out), str(checkpoint_dir)] + ([str(resume_dir)] if resume_dir else [])
    result = launch("tests/workers/zero_checks.py", args, np=np_, launcher="horovodrun", timeout=300)
    assert result.returncode == 0, explain(result)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(np_)]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    base = tmp_path_factory.mktemp("zero_two_workers")
    (base / "out").mkdir()
    return run_workers(base / "out", 2, base / "checkpoints"), base / "checkpoints"


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory, two_workers):
    base = tmp_path_factory.mktemp("zero_three_workers")
    (base / "out").mkdir()
    shutil.copytree(two_workers[1], base / "resume")   # the 2-worker checkpoint, resumed here at 3
    return run_workers(base / "out", 3, base / "checkpoints", base / "resume"), base / "checkpoints"


@pytest.fixture(params=[2, 3])
def launched(request):
    return request.param, request.getfixturevalue({2: "two_workers", 3: "three_workers"}[request.param])[0]


def test_launched_sharded_equals_unsharded_on_every_rank(launched):
    size, records = launched
    for rank, record in enumerate(records):
        assert record["size"] == size and record["rank"] == rank
        for name, run in zc.EQUAL_RUNS.items():
            assert record["equal"][name]["steps"] == zc.steps(size, **run)
            assert record["equal"][name]["max_diff"] <= 1e-5, (name, record["equal"][name])


def test_launched_optimizer_state_is_one_nth_per_rank(launched):
    size, records = launched
    groups, per_element = 2, {"adam": 2, "sgd": 1}   # state tensors per element: exp_avg(_sq); momentum
    for name in ("adam", "sgd"):
        unsharded = records[0]["equal"][name]["unsharded_bytes"]
        # one shard's rounding: per group, one padding element of each state tensor, and Adam's step
        rounding = groups * (4 * per_element[name] + (4 if name == "adam" else 0))
        held = [record["equal"][name]["sharded_bytes"] for record in records]
        assert all(record["equal"][name]["unsharded_bytes"] == unsharded for record in records)
        assert max(held) <= unsharded / size + rounding, (name, held, unsharded)
        assert all(record["equal"][name]["result_bytes"] == max(held) for record in records)   # the largest


def test_launched_fp16_compression_applies_to_the_reduce_scatter(launched):
    """Sharded and unsharded Adam runs with fp16 gradients on the wire agree (zc.FP16_TOLERANCE, why there), and
    each moved away from its float32 run by more than float32's 1e-5: the sharded path compressed its
    reduce-scatter (at 2 workers by more than the two paths' distance; measured 4.7e-5 at 2, 3.0e-4 at 3)."""
    size, records = launched
    for record in records:
        fp16 = record["fp16"]
        assert fp16["sharded_vs_unsharded"] <= zc.FP16_TOLERANCE[size], fp16
        assert fp16["sharded_vs_fp32"] > 1e-5 and fp16["unsharded_vs_fp32"] > 1e-5, fp16


def test_launched_best_checkpoints_are_sharded_without_a_gather(two_workers, tmp_path):
    """keep_best at 2 workers: no epoch gathered the state on any rank (each still holds 1/2 of it), each kept best
    checkpoint is one shard per rank plus rank 0's file and index, and the newest merges into a loadable file."""
    import re
    from hvdkit.merge import merge_checkpoint
    records, directory = two_workers
    best = str(directory).rstrip("/") + "_best/best"
    for record in records:
        assert record["best"]["gathered"] == [False, False, False], record["best"]
    files = records[0]["best"]["files"]
    numbers = sorted({int(re.match(r"ckpt-(\d+)", f).group(1)) for f in files})
    assert len(numbers) == 2, files
    for n in numbers:
        assert sorted(f for f in files if f.startswith(f"ckpt-{n:08d}")) == sorted(
            [f"ckpt-{n:08d}.bin", f"ckpt-{n:08d}.json"] + [f"ckpt-{n:08d}.shard-{r:05d}-of-00002.npz" for r in (0, 1)])
    merge_checkpoint(best, str(tmp_path / "merged"), number=numbers[-1])
    net = zc.model(batchnorm=False)
    plain = TorchAdapter(net, zc.optimizer_for("adam", net), torch.nn.functional.cross_entropy)
    plain.state_from_bytes((tmp_path / "merged" / "ckpt-00000000.bin").read_bytes())
    assert len(plain.optimizer.state) == len(list(net.parameters()))
    assert sum(v.numel() for s in plain.optimizer.state.values() for k, v in s.items() if k == "exp_avg") == \
        sum(p.numel() for p in net.parameters())


def test_a_checkpoint_written_at_two_workers_resumes_at_three_and_at_one(two_workers, three_workers, tmp_path):
    reference = uninterrupted_reference()
    for record in three_workers[0]:
        assert record["resumed_from_world"] == 2 and record["checkpoint"]["steps"] == zc.steps(3, 4)
        assert np.abs(np.asarray(record["checkpoint"]["params"]) - reference).max() <= 1e-5
    shutil.copytree(two_workers[1], tmp_path / "resume")
    net, _, result = resume_run(tmp_path / "resume", True)
    assert result.resumed_from["saved_world_size"] == 2 and result.global_step == zc.steps(1, zc.GLOBAL_BATCH)
    assert np.abs(zc.flat(net) - reference).max() <= 1e-5
    # and where it stopped, the 2 workers agreed with one process trained on the same global batches
    stopped, _, _ = resume_run(tmp_path / "alone", False, stop=True)
    for record in two_workers[0]:
        assert record["checkpoint"]["steps"] == zc.STOP_AT
        assert np.abs(np.asarray(record["checkpoint"]["params"]) - zc.flat(stopped)).max() <= 1e-5


def test_the_two_worker_checkpoint_is_a_shard_per_rank_and_merges_into_a_plain_model(two_workers, tmp_path):
    records, checkpoints = two_workers
    manifest = zc.two_shard_manifest(checkpoints)
    rank0 = torch.load(checkpoints / manifest["file"], weights_only=True)
    assert all(set(entry) == {"step"} for entry in rank0["optimizer"]["state"].values())   # no moments there

    assert main(["checkpoint", "merge", str(checkpoints), str(tmp_path / "merged")]) == 0
    merged = torch.load(tmp_path / "merged" / "ckpt-00000000.bin", weights_only=True)
    plain = zc.model(batchnorm=False)
    plain.load_state_dict(merged["model"])
    assert np.array_equal(zc.flat(plain), np.asarray(records[0]["checkpoint"]["params"], np.float32))
    # Adam's moments, merged from the two shards, are those of one process stopped at the same step
    optimizer = zc.optimizer_for("adam", plain)
    optimizer.load_state_dict(merged["optimizer"])
    _, alone, _ = resume_run(tmp_path / "alone", False, stop=True)
    expected = alone.optimizer.state_dict()["state"]
    for index, entry in optimizer.state_dict()["state"].items():
        assert float(entry["step"]) == float(expected[index]["step"]) == zc.STOP_AT
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(entry[key], expected[index][key], rtol=1e-4, atol=1e-7), (index, key)
