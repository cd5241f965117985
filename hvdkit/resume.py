"""Resuming: which checkpoint to load, where it left off, and the epoch's world-size layout from there.

Framework-free; the adapter turns the checkpoint's bytes into model and optimizer state.

Example::

    resumed = load_latest(store, adapter, n=1437, seed=0)        # None when the directory is empty
    progress.update(resumed_progress(resumed))
    progress["layout"] = next_layout(progress["layout"], progress["position"], world_size=2)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .checkpoint import CheckpointStore
from .errors import HvdkitError


def load_latest(store: CheckpointStore, adapter, n: int, seed: int) -> Optional[Dict[str, Any]]:
    """Load the newest usable checkpoint into ``adapter``; its progress and where it came from, or None.

    A checkpoint of another framework, or one the adapter cannot load (bad pickle, wrong model), is
    reported and the previous one tried; one of another dataset or seed stops the run (a wrong directory).
    """
    def accept(blob: bytes, manifest: Dict[str, Any]) -> Dict[str, Any]:
        name = manifest["file"]
        if manifest.get("framework", adapter.framework) != adapter.framework:
            raise HvdkitError(f"checkpoint {name} was written by {manifest.get('framework')}, not {adapter.framework}")
        try:
            progress = adapter.state_from_bytes(blob)
        except HvdkitError as e:
            raise HvdkitError(f"checkpoint {name}: {e}") from None
        if not isinstance(progress, dict) or not {"epoch", "position", "global_step"} <= set(progress):
            raise HvdkitError(f"checkpoint {name} holds no training progress (epoch, position, global_step)")
        return progress

    found = store.first_usable(accept)
    if found is None:
        return None
    _, manifest, progress = found
    if progress.get("n") != n or progress.get("seed") != seed:
        raise HvdkitError(
            f"checkpoint {manifest['file']} in {store.directory} was written for {progress.get('n')} samples "
            f"and seed {progress.get('seed')}, not {n} and {seed}; use another --checkpoint-dir")
    return dict(progress, file=manifest["file"], saved_world_size=manifest.get("world_size"))


def resumed_progress(resumed: Dict[str, Any]) -> Dict[str, Any]:
    """Where a checkpoint left off. One written before layouts were recorded began its epoch, at best
    knowledge, on the world that wrote it."""
    layout = resumed.get("layout") or ([[int(resumed["saved_world_size"]), 0]]
                                       if resumed.get("saved_world_size") else [])
    return dict({k: resumed[k] for k in ("epoch", "position", "global_step")}, layout=layout, rng=resumed.get("rng"),
                **{k: resumed[k] for k in ("best", "skipped") if resumed.get(k) is not None})


def resume_line(progress: Dict[str, Any], n: int, world_size: int) -> str:
    return (f"resumed from {progress['file']}: epoch {progress['epoch'] + 1}, sample {progress['position']} of {n}, "
            f"step {progress['global_step']} (written by {progress['saved_world_size']} workers, now {world_size})")


def next_layout(layout: Optional[List[List[int]]], position: int, world_size: int) -> List[List[int]]:
    """``[world_size, start]`` per stretch of the current epoch, ending with this world (always a new
    list, never the one a commit holds). A stream re-splits its remainder with it on a resize."""
    if position == 0 or not layout:
        return [[world_size, 0]]
    if layout[-1][0] == world_size:
        return [list(seg) for seg in layout]
    if layout[-1][1] == position and len(layout) > 1:  # that stretch trained nothing: replace it
        return [list(seg) for seg in layout[:-1]] + [[world_size, position]]
    return [list(seg) for seg in layout] + [[world_size, position]]
