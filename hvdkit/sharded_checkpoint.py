"""Sharded checkpoints: each rank writes its own shard of a sharded optimizer's state; one index ties them together.

Framework-free (numpy only). With ``shard_optimizer`` a static job's checkpoint ``ckpt-00000042`` is::

    ckpt-00000042.bin                          rank 0: the model, the optimizer's hyperparameters and scalars,
                                               the progress -- the adapter's blob without the per-element state
    ckpt-00000042.shard-00000-of-00002.npz     rank r: its slice of every flat state vector (an .npz, no pickle)
    ckpt-00000042.shard-00001-of-00002.npz
    ckpt-00000042.json                         the index, written last by rank 0: sha256 and size of the .bin and
                                               of every shard, and ``shard_index`` (below)

``shard_index`` says how to rebuild the unsharded state: ``world`` (the shard count), ``flats`` (each flat
vector's padded length; rank r's shard is its r-th equal slice) and ``assemble``, one row per unsharded state
array: ``{"key", "flat", "offset", "shape"}`` (that array is ``flat[offset:offset + prod(shape)]``). Every rank
writes its shard atomically before rank 0 writes the index, so a checkpoint exists only once all of it does; a
damaged or missing shard fails its checksum and the checkpoint is skipped like a damaged single file.

Loading at any world size goes through :func:`assemble` (the "universal checkpoint" idea): the flat vectors are
put back together, cut into unsharded arrays, and the framework merges them into its ordinary blob
(``hvdkit.torch.zero.merge_blob``, ``hvdkit.keras.zero.merge_blob``), which then loads -- and reshards -- as an
unsharded checkpoint does. ``hvdkit checkpoint merge`` writes that blob as an ordinary single-file checkpoint.

Example::

    entry = write_shard("/ckpt", number=42, rank=1, world=2, arrays={"g0/exp_avg": shard})
    arrays = assemble("/ckpt", manifest)      # {"0/exp_avg": array of the parameter's shape, ...}
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Dict, List, Tuple

import numpy as np

from .errors import HvdkitError

SHARD_NAME = re.compile(r"^ckpt-(\d{8})\.shard-(\d{5})-of-(\d{5})\.npz$")


def shard_file(number: int, rank: int, world: int) -> str:
    """The file name of rank ``rank``'s shard of checkpoint ``number``."""
    return f"ckpt-{number:08d}.shard-{rank:05d}-of-{world:05d}.npz"


def shard_files(directory: str) -> List[Tuple[int, str]]:
    """(checkpoint number, file name) of every shard file in ``directory``."""
    if not os.path.isdir(directory):
        return []
    return sorted((int(m.group(1)), n) for n in os.listdir(directory) if (m := SHARD_NAME.match(n)))


def write_shard(directory: str, number: int, rank: int, world: int, arrays: Dict[str, np.ndarray]) -> Dict:
    """Write this rank's ``arrays`` (1-D, one per flat state vector) atomically; the index's entry for it."""
    from .checkpoint import atomic_write
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.ascontiguousarray(a).reshape(-1) for name, a in arrays.items()})
    data = buffer.getvalue()
    name = shard_file(number, rank, world)
    atomic_write(os.path.join(directory, name), data)
    return {"rank": rank, "file": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def check_index(directory: str, entries: List[Dict], world: int) -> None:
    """Rank 0, before it writes the index: every rank's shard is there, as written. A shard written on another
    host but missing here means the directory is not shared (each host wrote into its own disk)."""
    if sorted(e["rank"] for e in entries) != list(range(world)):
        raise HvdkitError(f"internal error: shard entries for ranks {sorted(e['rank'] for e in entries)} in a "
                          f"world of {world}; please report it")
    for entry in entries:
        path = os.path.join(directory, entry["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != entry["size"]:
            raise HvdkitError(
                f"rank {entry['rank']} wrote its optimizer shard {path}, but rank 0 does not see it there: the "
                "checkpoint directory is not shared between the hosts; pass a --checkpoint-dir on a shared "
                "filesystem (NFS, Lustre, ...), or drop --shard-optimizer to write single-file checkpoints from rank 0")


def _read_shard(directory: str, entry: Dict) -> Dict[str, np.ndarray]:
    path = os.path.join(directory, str(entry.get("file")))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HvdkitError(f"optimizer shard {path} is unreadable ({e.strerror}); it was not loaded") from None
    if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise HvdkitError(f"optimizer shard {path} is corrupt: {len(data)} bytes, sha256 does not match the index "
                          f"({entry.get('size')} bytes expected); it was not loaded")
    with np.load(io.BytesIO(data), allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}


def assemble(directory: str, manifest: Dict) -> Dict[str, np.ndarray]:
    """The unsharded state arrays of a sharded checkpoint (``manifest``: its index), keyed as its
    ``shard_index["assemble"]`` says. Every shard is checked against its sha256 first; raises HvdkitError
    naming the file that is missing or damaged, or an index that does not add up."""
    index, entries = manifest.get("shard_index"), manifest.get("shards")
    try:
        world, flats, rows = int(index["world"]), dict(index["flats"]), list(index["assemble"])
        if sorted(int(e["rank"]) for e in entries) != list(range(world)):
            raise ValueError(f"shards of ranks {sorted(int(e['rank']) for e in entries)} for {world} workers")
    except (TypeError, KeyError, ValueError) as e:
        raise HvdkitError(f"checkpoint {manifest.get('file')} has a malformed shard index ({e}); it was not "
                          "loaded") from None
    parts: Dict[str, List[np.ndarray]] = {name: [None] * world for name in flats}
    for entry in entries:
        for name, values in _read_shard(directory, entry).items():
            if name in parts:
                parts[name][int(entry["rank"])] = values
    whole = {}
    for name, padded in flats.items():
        if any(p is None for p in parts[name]) or sum(len(p) for p in parts[name]) != int(padded):
            raise HvdkitError(f"checkpoint {manifest.get('file')}: the shards of {name} do not add up to its "
                              f"{padded} elements; it was not loaded")
        whole[name] = np.concatenate(parts[name])
    out = {}
    for row in rows:
        size = int(np.prod(row["shape"], dtype=np.int64))
        flat, at = whole[row["flat"]], int(row["offset"])
        if at + size > len(flat):
            raise HvdkitError(f"checkpoint {manifest.get('file')}: {row['key']} lies outside {row['flat']}; "
                              "it was not loaded")
        out[row["key"]] = flat[at:at + size].reshape(row["shape"]).copy()
    return out
