"""The process role: who this worker is among how many, and the collectives the trainer needs.

Framework-free. Each framework has a ``process`` module with the same two classes:
``HorovodProcess`` (Horovod's collectives; what a launched job uses) and ``LocalProcess`` (world size 1,
every collective the identity, no Horovod at all: the trainer, commits, restore, resume and callbacks get
fast in-process tests). The trainer talks to a :class:`Process`; an adapter additionally asks its
framework's process for the tensor collectives (gradient allreduce, parameter broadcast).

Example::

    from hvdkit.torch.process import LocalProcess
    Trainer(adapter, TrainConfig(epochs=1), process=LocalProcess()).fit((x, y))
"""
from __future__ import annotations

import abc
import os
from typing import Any, Callable, List

import numpy as np

from .errors import HvdkitError


class Process(abc.ABC):
    """Rank, size, the metric and object collectives, and the elastic retry loop of one framework."""

    #: True when the world cannot change during the run (a static job; the trainer sets it): one worker then
    #: skips Horovod for the per-step tensor collectives (see :meth:`HorovodObjects.alone`).
    fixed_world: bool = False

    @abc.abstractmethod
    def init(self, seed: int, threads: int) -> None:
        """Start the collectives, pin ``threads`` compute threads, seed the framework's RNG."""

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @property
    @abc.abstractmethod
    def local_rank(self) -> int: ...

    @property
    def hostname(self) -> str:
        """The host this worker runs on, as the launcher named it (elastic logs: who joined or left)."""
        return os.environ.get("HOROVOD_HOSTNAME", "localhost")

    @abc.abstractmethod
    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise float64 sum over ranks (metrics, counts)."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Rank ``root``'s picklable ``obj`` on every rank."""

    @abc.abstractmethod
    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""

    @abc.abstractmethod
    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``fn(state)`` inside the elastic retry loop: a lost peer restores ``state`` and runs it again."""

    def is_peer_lost(self, error: BaseException) -> bool:
        """True when ``error`` means a peer vanished mid-collective (elastic: roll back), not a bug to report."""
        from horovod.common.exceptions import HorovodInternalError
        return isinstance(error, HorovodInternalError)

    def abort(self) -> None:
        """Stop this rank's collectives so that every other rank's pending one fails now (one rank raised)."""


class HorovodObjects:
    """Rank, size and object collectives, identical in ``horovod.torch`` and ``horovod.tensorflow``.

    Mixed into a framework's ``HorovodProcess``, which sets ``self.hvd`` in ``init``.
    """

    hvd: Any = None

    @property
    def rank(self) -> int:
        return self.hvd.rank()

    @property
    def size(self) -> int:
        return self.hvd.size()

    @property
    def local_rank(self) -> int:
        return self.hvd.local_rank()

    def alone(self) -> bool:
        """A static job of one worker: averaging over one rank is the identity, so the per-step tensor collectives
        (gradients, a sharded optimizer's reduce-scatter and allgather) skip Horovod instead of waiting for its
        background cycle each step. Elastic jobs never do: a worker may join, and the traced steps must hold the
        collectives then."""
        return self.fixed_world and self.size == 1

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=root, name="hvdkit.object")

    def allgather_object(self, obj: Any) -> List[Any]:
        return self.hvd.allgather_object(obj, name="hvdkit.gather")

    def abort(self) -> None:
        # Horovod's coordinated shutdown: every rank's pending and next collective raises (torch:
        # HorovodInternalError; TF: an op error naming Horovod) instead of waiting for this rank.
        self.hvd.shutdown()


class LocalProcess(Process):
    """World size 1 without Horovod's collectives: each is the identity; elastic retries run in-process.

    A framework's ``LocalProcess`` subclasses this and adds thread pinning, seeding and the tensor
    collectives its adapter needs (identities too).
    """

    def init(self, seed: int, threads: int) -> None:
        pass

    rank = property(lambda self: 0)
    size = property(lambda self: 1)
    local_rank = property(lambda self: 0)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.array(values, dtype=np.float64)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def elastic_run(self, fn):
        # Horovod's own framework-free retry loop, with nothing to re-initialise: a test can raise
        # HorovodInternalError in a callback and watch the state roll back, all in one process.
        from horovod.common.elastic import run_fn
        return run_fn(guard_rollbacks(fn, self), lambda: None)


# ---- stalls: a rank stuck outside the collectives ---------------------------------------------------------
# Horovod's stall check (on by default) only warns: the coordinator names the ranks missing from a collective
# every HOROVOD_STALL_CHECK_TIME_SECONDS (60 s), and its default HOROVOD_STALL_SHUTDOWN_TIME_SECONDS of 0 lets
# the job wait forever. hvdkit shuts Horovod down after 600 s instead: ten warnings' worth, far above any wait a
# healthy job has here (a checkpoint written by rank 0 while the others wait, a rank re-reading a stream's
# remainder after a resize, first-step tracing), and the same as horovodrun's --elastic-timeout, so a hung job
# frees its hosts in minutes, not never. Every rank's pending collective then fails (torch: HorovodInternalError;
# TF: an op error naming Horovod) and the rank that stalled fails at its next one.
STALL_WARNING_SECONDS = 60
STALL_SHUTDOWN_SECONDS = 600


def apply_stall_defaults(environ=os.environ) -> None:
    """Set hvdkit's stall-check defaults before ``hvd.init()``, leaving every variable the user set alone.

    ``HOROVOD_STALL_CHECK_DISABLE=1`` (horovodrun ``--no-stall-check``) turns the check off and is respected;
    a user's warning time above 600 s moves the shutdown to twice that (Horovod ignores a shutdown time
    below the warning time).

    Example::

        >>> env = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5"}
        >>> apply_stall_defaults(env); env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]
        '600'
    """
    if environ.get("HOROVOD_STALL_CHECK_DISABLE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(STALL_WARNING_SECONDS))
    try:
        warning = int(environ["HOROVOD_STALL_CHECK_TIME_SECONDS"])
    except ValueError:  # Horovod will complain about it itself; do not guess a shutdown time from it
        return
    environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                       str(STALL_SHUTDOWN_SECONDS if warning * 2 <= STALL_SHUTDOWN_SECONDS else warning * 2))


#: Restarts of an elastic job from one and the same commit before hvdkit stops it (see guard_rollbacks).
ROLLBACK_LIMIT = 3


def guard_rollbacks(fn: Callable[[Any], Any], process: Process, limit: int = ROLLBACK_LIMIT) -> Callable[[Any], Any]:
    """``fn(state)`` for Horovod's elastic retry loop, refusing to restart it from the same commit ``limit`` times.

    A stall shutdown looks like a lost peer to the elastic loop: every rank rolls back to the last commit and
    retries. Once, that recovers a rank that was only slow; a rank that stalls at the same place every time
    would make the job retry forever (each try costing the stall shutdown time). Horovod's retries go through
    here right after the state sync: a restart with no commit since the previous one counts, any commit resets
    the count, and rank 0's count is broadcast so that every rank (a worker that just joined too) stops alike.
    ``state.commits`` (``hvdkit.elastic.ElasticState``) tells commits apart; a state without it is not guarded.

    Example::

        run = process.elastic_run(body)    # HorovodProcess.elastic_run wraps body with guard_rollbacks
    """
    seen = {"commits": None, "repeats": 0}

    def guarded(state):
        commits = getattr(state, "commits", None)
        if commits is not None:
            seen["repeats"] = seen["repeats"] + 1 if commits == seen["commits"] else 0
            seen["commits"] = commits
            repeats = process.broadcast_object(seen["repeats"])
            if repeats >= limit:
                raise HvdkitError(
                    f"the elastic job restarted {repeats} times in a row from the same commit without training a "
                    "step further (a rank stalled or a worker was lost each time); stopping instead of retrying "
                    "forever. See the first error, or Horovod's stall warning naming the missing ranks, above")
        return fn(state)
    return guarded
