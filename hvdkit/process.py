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


class Process(abc.ABC):
    """Rank, size, the metric and object collectives, and the elastic retry loop of one framework."""

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
        return run_fn(fn, lambda: None)
