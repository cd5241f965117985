"""``hvdkit checkpoint merge``: a sharded checkpoint (``--shard-optimizer``) as an ordinary single-file one.

The shards are checked against the index's checksums, put back together (:func:`hvdkit.sharded_checkpoint.assemble`)
and merged into rank 0's blob by the framework that wrote it; the result is written into another checkpoint
directory, in the format an unsharded run writes: it loads into a plain model (``torch.load(path)["model"]``,
or the ``model/<i>`` arrays of the Keras npz), and a Trainer resumes from it at any world size, sharded or not.

Example::

    hvdkit checkpoint merge results/ckpt results/merged
    # merged results/ckpt/ckpt-00000004.json (2 shards, written by 2 workers) into results/merged/ckpt-00000000.bin
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .checkpoint import CheckpointStore
from .errors import HvdkitError

_META_DROPPED = ("sha256", "size", "file", "saved_at", "shards", "shard_index")


def _merger(framework: str):
    if framework == "torch":
        from .torch.zero import merge_blob
    elif framework == "tensorflow":
        from .keras.zero import merge_blob
    else:
        raise HvdkitError(f"the checkpoint names no known framework ({framework!r}); it was not written by hvdkit")
    return merge_blob


def merge_checkpoint(source: str, dest: str, number: Optional[int] = None) -> str:
    """Merge checkpoint ``number`` (default: the newest) of ``source`` into a new checkpoint in ``dest``; one line
    saying what was written. Nothing is changed in ``source``."""
    src = CheckpointStore(source)
    numbers = src.numbers()
    if not numbers:
        raise HvdkitError(f"no checkpoint in {src.directory}; pass the --checkpoint-dir of a run")
    number = numbers[-1] if number is None else number
    if number not in numbers:
        raise HvdkitError(f"no checkpoint {number} in {src.directory} (there are {', '.join(map(str, numbers))}); "
                          "pass one of those to --number")
    if os.path.abspath(dest) == src.directory:
        raise HvdkitError("the destination is the source directory; pass another directory to write into")
    manifest_path = src.manifest_path(number)
    try:
        with open(manifest_path, "rb") as f:
            framework = json.loads(f.read()).get("framework")
    except (OSError, ValueError, AttributeError) as e:
        raise HvdkitError(f"checkpoint manifest {manifest_path} is unreadable ({e}); nothing was merged") from None
    src.merge = lambda blob, arrays: _merger(framework)(blob, arrays)
    blob, manifest = src.verify(number)
    if manifest.get("shards") is None:
        raise HvdkitError(f"checkpoint {manifest['file']} in {src.directory} is not sharded: it is one file "
                          "already, load it as it is")
    meta = {k: v for k, v in manifest.items() if k not in _META_DROPPED}
    path = CheckpointStore(dest, keep=10 ** 6).save(blob, dict(meta, merged_from=os.path.join(src.directory,
                                                                                              manifest["file"])))
    return (f"merged {manifest_path} ({len(manifest['shards'])} shards, written by {manifest['shard_index']['world']} "
            f"workers) into {path}")
