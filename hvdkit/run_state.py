"""What one ``Trainer.fit`` call keeps and returns: the result users read, the bookkeeping the loop keeps.

Example::

    result = trainer.fit(train, test)
    print(result.eval["accuracy"], result.samples_per_sec, result.world_size)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from .audit import AuditLog


# Rank 0 logs a line with this after every rank reached the end of fit (outputs written); hvdkit launch looks for it.
COMPLETE_MARK = "training complete"
# ... and this when a fit begins (a script may call fit more than once).
START_MARK = "training starts"


def fresh_progress(n: int, seed: int) -> Dict[str, Any]:
    """Where a run stands (what commits and checkpoints save): the epoch, samples done in it, the step."""
    return {"epoch": 0, "position": 0, "global_step": 0, "n": n, "seed": seed, "layout": []}


@dataclasses.dataclass
class FitResult:
    """What a run did, the same on every rank (metrics are already reduced over ranks) but ``rank``."""
    world_size: int
    epochs_done: int
    global_step: int
    global_batch_size: int
    train_samples_per_epoch: int
    samples_trained: int
    samples_per_sec: float
    history: List[Dict[str, float]]
    eval: Dict[str, float]
    stopped_early: bool
    resumed_from: Optional[Dict[str, Any]]
    resets: int = 0
    rank: int = 0
    best: Optional[Dict[str, Any]] = None    # the monitored metric's record (TrainConfig.monitor), if watched
    skipped_steps: int = 0                   # steps whose update was skipped (nonfinite="skip")
    optimizer_state_bytes: int = 0           # the most optimizer state one rank held at the end (its tensors)


@dataclasses.dataclass
class Run:
    """Bookkeeping of one ``fit`` call. ``progress`` is what commits save; the rest is not committed."""
    progress: Dict[str, Any]
    audit: Optional[AuditLog] = None
    history: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    eval_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    trained: int = 0
    train_time: float = 0.0
    stopped: bool = False
    checked_first: bool = False
    resets: int = 0
    rolled_back: bool = False
    hosts: Optional[List[str]] = None
    fatal: Optional[tuple] = None          # (this rank's error line, bad input?), handed to every rank (elastic)
    optimizer_state_bytes: int = 0         # max over ranks, measured at the end (Trainer._finish)
    result: Optional[FitResult] = None     # set when the run finished (Trainer._finish)
