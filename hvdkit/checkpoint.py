"""Atomic, checksummed checkpoints; framework-free (the adapter turns its state into bytes).

Layout of a checkpoint directory::

    ckpt-00000042.bin    the adapter's bytes (for torch: a plain ``torch.save`` file)
    ckpt-00000042.json   manifest: sha256 and size of the .bin, progress, world size, time
    best/ckpt-00000007.* with ``keep_best``: the best checkpoints by the monitored metric (:class:`BestStore`)
    ckpt-00000042.shard-*.npz   with a sharded optimizer: each rank's shard of its state (see
                         :mod:`hvdkit.sharded_checkpoint`), listed in the manifest

Both are written to a temporary name, fsynced and renamed, the manifest last: a checkpoint
exists only once its manifest does, and a reader checks the .bin against the manifest's
sha256, so a crash mid-write or a truncated copy is detected, reported, and never loaded.
Only rank 0 writes; the newest ``keep`` checkpoints are kept.

Example::

    store = CheckpointStore("/tmp/run1", keep=3)
    store.save(b"...", {"epoch": 1, "position": 0})
    blob, manifest = store.load_latest()
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

from .errors import HvdkitError
from .sharded_checkpoint import assemble, check_index, shard_files

_NAME = re.compile(r"^ckpt-(\d{8})\.json$")


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def ensure_writable_dir(path: str, what: str = "checkpoint directory", flag: str = "--checkpoint-dir") -> str:
    """Create ``path`` if needed and prove it is writable; raise one clear HvdkitError otherwise."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise HvdkitError(f"{what} {path} is a file, not a directory; pass a directory to {flag} (it is created if "
                          "missing)")
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")
        probe.close()
    except OSError as e:
        raise HvdkitError(f"{what} {path} cannot be created or written ({e.strerror}); pass a writable {flag}") \
            from None
    return path


class CheckpointStore:
    """Numbered checkpoints in one directory; see the module docstring for the format."""

    def __init__(self, directory: str, keep: int = 3, log: Callable[[str], None] = lambda msg: None,
                 merge: Optional[Callable[[bytes, Dict], bytes]] = None):
        if keep < 1:
            raise HvdkitError(f"keep must be >= 1 (got {keep})")
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.log = log
        self.merge = merge   # (rank 0's blob, unsharded arrays) -> an ordinary blob: reads sharded checkpoints

    def _paths(self, number: int) -> Tuple[str, str]:
        base = os.path.join(self.directory, f"ckpt-{number:08d}")
        return base + ".bin", base + ".json"

    def manifest_path(self, number: int) -> str:
        return self._paths(number)[1]

    def numbers(self) -> List[int]:
        """Checkpoint numbers that have a manifest, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = (_NAME.match(name) for name in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    def next_number(self) -> int:
        """The number the next :meth:`save` writes (a sharded save tells every rank before they write)."""
        existing = self.numbers()
        return existing[-1] + 1 if existing else 0

    def save(self, blob: bytes, meta: Dict, shards: Optional[List[Dict]] = None, shard_index: Optional[Dict] = None,
             number: Optional[int] = None) -> str:
        """Write one checkpoint atomically, then drop the oldest beyond ``keep``. Returns its path. A sharded one:
        ``shards`` (every rank's :func:`~hvdkit.sharded_checkpoint.write_shard` entry, written already as
        ``number``) and ``shard_index`` go into the manifest, after checking that every shard is here."""
        ensure_writable_dir(self.directory)
        existing = self.numbers()
        number = self.next_number() if number is None else number
        bin_path = self._write(number, blob, meta, shards, shard_index)
        for old in existing[:max(0, len(existing) + 1 - self.keep)]:
            self._delete(old)
        self._drop_orphan_shards()
        return bin_path

    def _write(self, number: int, blob: bytes, meta: Dict, shards: Optional[List[Dict]],
               shard_index: Optional[Dict]) -> str:
        """Checkpoint ``number``: its blob, then its manifest (the index of its shards, if any) last."""
        bin_path, json_path = self._paths(number)
        if shards is not None:
            check_index(self.directory, shards, int(shard_index["world"]))
        atomic_write(bin_path, blob)
        manifest = dict(meta, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob),
                        file=os.path.basename(bin_path), saved_at=time.time())
        if shards is not None:
            manifest.update(shards=sorted(shards, key=lambda e: e["rank"]), shard_index=shard_index)
        atomic_write(json_path, json.dumps(manifest, sort_keys=True).encode())
        return bin_path

    def _drop_orphan_shards(self) -> None:
        """Shards no kept manifest lists: a save cut short, or a checkpoint deleted meanwhile."""
        kept = set(self.numbers())
        for number_of, name in shard_files(self.directory):
            if number_of not in kept:
                os.unlink(os.path.join(self.directory, name))

    def _delete(self, number: int) -> None:
        """Checkpoint ``number``'s files, manifest first: a checkpoint without its manifest does not exist."""
        bin_path, json_path = self._paths(number)
        for path in [json_path, bin_path] + [os.path.join(self.directory, n) for k, n in shard_files(self.directory) if k == number]:
            if os.path.exists(path):
                os.unlink(path)

    def newest_step(self) -> Optional[int]:
        """The global step in the newest readable manifest (None when there is none): is the final state on disk?"""
        for number in reversed(self.numbers()):
            try:
                with open(self._paths(number)[1], "rb") as f:
                    return int(json.loads(f.read())["global_step"])
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return None

    def verify(self, number: int) -> Tuple[bytes, Dict]:
        """Read checkpoint ``number``; raise HvdkitError naming the file when it is damaged."""
        bin_path, json_path = self._paths(number)
        try:
            with open(json_path, "rb") as f:
                manifest = json.loads(f.read())
            with open(bin_path, "rb") as f:
                blob = f.read()
        except (OSError, ValueError) as e:
            raise HvdkitError(f"checkpoint {bin_path} is unreadable ({e}); it was not loaded") from None
        if not isinstance(manifest, dict) or not {"size", "sha256", "file"} <= set(manifest):
            raise HvdkitError(f"checkpoint {bin_path} has a malformed manifest {os.path.basename(json_path)} (not an "
                              "object with size, sha256 and file); it was not loaded")
        if len(blob) != manifest.get("size") or hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
            raise HvdkitError(
                f"checkpoint {bin_path} is corrupt: {len(blob)} bytes, sha256 does not match its manifest "
                f"({manifest.get('size')} bytes expected); it was not loaded")
        if manifest.get("shards") is not None:   # sharded: the shards merged into the ordinary blob
            if self.merge is None:
                raise HvdkitError(f"checkpoint {bin_path} is sharded (written with --shard-optimizer) and nothing here "
                                  "merges it; load it through a Trainer, or merge it first with "
                                  "`hvdkit checkpoint merge`")
            arrays = assemble(self.directory, manifest)
            try:
                blob = self.merge(blob, arrays)
            except HvdkitError:
                raise
            except Exception as e:   # a file from outside: its failure to merge is the file's
                raise HvdkitError(f"checkpoint {bin_path}: its shards do not merge ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); it was not loaded") from None
        return blob, manifest

    def load_latest(self) -> Optional[Tuple[bytes, Dict]]:
        """The newest checkpoint that verifies, as ``(blob, manifest)``; see :meth:`first_usable`."""
        found = self.first_usable()
        return found[:2] if found else None

    def first_usable(self, accept: Callable[[bytes, Dict], object] = lambda blob, manifest: None):
        """The newest checkpoint that verifies and that ``accept`` takes, as ``(blob, manifest, accepted)``;
        damaged newer ones (or ones ``accept`` refuses with an HvdkitError) are reported and skipped.

        Returns None for an empty directory. Raises when checkpoints exist but none is usable:
        starting from scratch silently would overwrite the run the user meant to resume.
        """
        problems = []
        for number in reversed(self.numbers()):
            try:
                blob, manifest = self.verify(number)
                return blob, manifest, accept(blob, manifest)
            except HvdkitError as e:
                problems.append(str(e))
                self.log(f"warning: {e}; falling back to an older checkpoint")
        if problems:
            raise HvdkitError(f"no usable checkpoint in {self.directory}: {problems[0]}; nothing was changed there: "
                              "pass another --checkpoint-dir, or move these files away to start from scratch")
        return None


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


class BestStore(CheckpointStore):
    """The ``keep`` best checkpoints by a monitored metric, in their own directory (``<checkpoint_dir>/best``).

    Same format as :class:`CheckpointStore` (each written atomically, sha256-checked manifest last); each
    manifest also holds ``monitor``, ``monitor_value``, ``monitor_mode`` and ``epoch`` (the evaluation's epoch).
    A checkpoint is written when fewer than ``keep`` are kept or its value beats the worst kept one (ties keep the
    older), and the worst beyond ``keep`` is deleted after the new one is complete. Entries of epochs at or after
    the one being evaluated belong to a timeline that was rolled back or never finished (a crash, a resume from
    an earlier checkpoint) and are dropped first. Only rank 0 calls :meth:`offer`.

    Example::

        best = BestStore("/tmp/run1/best", keep=3)
        best.offer(blob, {"epoch": 4, ...}, monitor="eval_accuracy", value=0.97, mode="max")   # path or None
        best.ranked()      # [(value, epoch, number, manifest), ...] best first
    """

    def ranked(self, mode: str = None) -> List[Tuple[float, int, int, Dict]]:
        """``(value, epoch, number, manifest)`` of every kept checkpoint with a readable manifest, best first
        (``mode`` default: each manifest's own)."""
        entries = []
        for number in self.numbers():
            try:
                with open(self._paths(number)[1], "rb") as f:
                    manifest = json.loads(f.read())
                entries.append((float(manifest["monitor_value"]), int(manifest["epoch"]), number, manifest))
            except (OSError, ValueError, KeyError, TypeError):
                self.log(f"warning: best checkpoint manifest {self._paths(number)[1]} is unreadable; ignored")
        mode = mode or (entries[0][3].get("monitor_mode", "min") if entries else "min")
        sign = 1.0 if mode == "min" else -1.0
        return sorted(entries, key=lambda e: (sign * e[0], e[1]))

    def offer(self, blob: bytes, meta: Dict, monitor: str, value: float, mode: str) -> Optional[str]:
        """Keep this checkpoint if it is among the ``keep`` best; returns its path, or None if not kept."""
        number = self.place(int(meta["epoch"]), monitor, value, mode)
        return None if number is None else self.write(number, blob, meta, monitor, value, mode)

    def place(self, epoch: int, monitor: str, value: float, mode: str) -> Optional[int]:
        """The number a checkpoint of ``epoch`` scoring ``value`` is written as, or None when it is not among the
        ``keep`` best. Drops entries of a rolled-back timeline and of another monitor first. (A sharded best
        checkpoint: rank 0 places it and tells every rank the number before they write their shards.)"""
        entries = self.ranked(mode)
        for _, old_epoch, number, manifest in entries:
            if old_epoch >= epoch:
                self._delete(number)  # a timeline that was rolled back or never finished
            elif manifest.get("monitor") != monitor or manifest.get("monitor_mode") != mode:
                self.log(f"warning: removing best checkpoint {manifest.get('file')}: ranked by "
                         f"{manifest.get('monitor')} ({manifest.get('monitor_mode')}), not {monitor} ({mode})")
                self._delete(number)
        entries = [e for e in entries if e[1] < epoch and e[3].get("monitor") == monitor
                   and e[3].get("monitor_mode") == mode]
        if value != value:  # NaN ranks nowhere
            return None
        if len(entries) >= self.keep and not _better(value, entries[self.keep - 1][0], mode):
            return None
        ensure_writable_dir(self.directory)
        return self.next_number()

    def write(self, number: int, blob: bytes, meta: Dict, monitor: str, value: float, mode: str,
              shards: Optional[List[Dict]] = None, shard_index: Optional[Dict] = None) -> str:
        """Write the checkpoint :meth:`place` gave ``number`` (with its shards' index, when sharded), then delete
        the worst beyond ``keep``; returns its path."""
        meta = dict(meta, monitor=monitor, monitor_value=float(value), monitor_mode=mode)
        bin_path = self._write(number, blob, meta, shards, shard_index)
        for _, _, old, _ in self.ranked(mode)[self.keep:]:
            self._delete(old)
        self._drop_orphan_shards()
        return bin_path
