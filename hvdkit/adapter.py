"""The contract between the framework-free trainer and a framework (torch now, Keras next).

An adapter owns the model, the optimizer and Horovod's collectives for one framework; the
trainer owns everything else (data order, steps, metrics, checkpoints, side effects). Every
method here is called on every rank in the same order, so the collectives inside line up.

Example (what :class:`hvdkit.Trainer` does with it)::

    adapter.init(seed=0, threads=1)
    adapter.prepare(lr_factor=adapter.size, accumulation=1)   # wrap optimizer, scale LR
    adapter.broadcast_state()                                 # rank 0's model everywhere
    loss_sum, count = adapter.train_step(data, step)
    sums = adapter.eval_batch(data, ids)         # {"loss": .., "correct": .., "count": ..}
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from .sharding import Step, eval_indices, plan_epoch


class Adapter(abc.ABC):
    """One framework behind the trainer. Subclasses: ``hvdkit.torch.TorchAdapter``."""

    framework: str = "?"
    #: Set by the trainer when ``before_step`` must see real sample ids (audit mode); adapters whose
    #: steps carry only positions (streams) then pay to look the ids up.
    record_ids: bool = False

    # ---- process and collectives ---------------------------------------------------------
    @abc.abstractmethod
    def init(self, seed: int, threads: int) -> None:
        """Initialise Horovod, pin ``threads`` compute threads, seed the framework's RNG."""

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @property
    @abc.abstractmethod
    def local_rank(self) -> int: ...

    @abc.abstractmethod
    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise float64 sum over ranks (metrics, counts)."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Rank ``root``'s picklable ``obj`` on every rank."""

    @abc.abstractmethod
    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""

    # ---- model and optimizer -------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, lr_factor: float, accumulation: int) -> None:
        """Wrap the optimizer for allreduce (reducing every ``accumulation`` backward passes) and
        scale the LR by ``lr_factor``. No collective: the trainer broadcasts the state next."""

    @abc.abstractmethod
    def set_lr_factor(self, factor: float) -> None:
        """Set every LR to ``factor`` times the LR the user gave (warmup, rescaling)."""

    def _cached(self, data: Any, build: Callable[[Any], Any]) -> Any:
        """``build(data)``, once per dataset object. The object is kept with its result: a dead object's
        ``id`` gets reused by the next one, which must not find the old result."""
        cache = self.__dict__.setdefault("_dataset_cache", {})
        hit = cache.get(id(data))
        if hit is None or hit[0] is not data:
            cache[id(data)] = hit = (data, build(data))
        return hit[1]

    @abc.abstractmethod
    def dataset_len(self, data: Any) -> int:
        """Number of samples in ``data`` (same on every rank)."""

    @abc.abstractmethod
    def train_step(self, data: Any, step: Step) -> Tuple[float, int]:
        """One optimizer step over ``step.micro_batches``; returns (sum of sample losses, samples) here."""

    def plan_epoch(self, data: Any, epoch: int, start: int, config, layout=None) -> List[Step]:
        """This rank's steps of ``epoch`` from sample ``start`` on; the same count on every rank.

        layout: ``[world_size, start]`` of each stretch of this epoch (see ``sharding.stream_segments``);
        sample ids permuted globally need none, since the rest of the permutation is simply re-split.
        """
        return plan_epoch(self.dataset_len(data), self.rank, self.size, config.batch_size, config.seed, epoch,
                          config.accumulation, start=start, shuffle=config.shuffle)

    def eval_sums(self, data: Any, batch_size: int) -> Dict[str, float]:
        """This rank's metric sums over its unpadded evaluation share (see ``eval_indices``)."""
        ids = eval_indices(self.dataset_len(data), self.rank, self.size)
        totals: Dict[str, float] = {}
        for lo in range(0, max(len(ids), 1), batch_size):  # a rank with no samples still reports zeros
            for key, value in self.eval_batch(data, ids[lo:lo + batch_size]).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return totals

    def run_epoch(self, data: Any, steps: List[Step], before_step: Callable[[Step], None],
                  after_step: Callable[[Step, float, int], bool]) -> Tuple[float, int]:
        """Run ``steps`` (every rank the same number); ``after_step`` returning True ends the epoch early.

        Returns this rank's (sum of sample losses, samples). Adapters whose framework owns the loop
        (Keras ``model.fit``) override this and call the two hooks from that loop.
        """
        loss_sum, count = 0.0, 0
        for step in steps:
            before_step(step)
            step_loss, step_count = self.train_step(data, step)
            loss_sum += step_loss
            count += step_count
            if after_step(step, step_loss, step_count):
                break
        return loss_sum, count

    @abc.abstractmethod
    def eval_batch(self, data: Any, ids: np.ndarray) -> Dict[str, float]:
        """Sums over the samples ``ids``: at least ``loss`` (summed sample losses) and ``count``."""

    @abc.abstractmethod
    def parameter_checksums(self) -> List[Tuple[str, int]]:
        """(name, checksum of the exact bytes) for every parameter, in a fixed order."""

    # ---- state -------------------------------------------------------------------------------
    @abc.abstractmethod
    def state_to_bytes(self, progress: Dict[str, Any]) -> bytes:
        """Model, optimizer and ``progress`` as one blob (rank 0 calls this alone)."""

    @abc.abstractmethod
    def state_from_bytes(self, blob: bytes) -> Dict[str, Any]:
        """Load a blob from :meth:`state_to_bytes` into model and optimizer; return its progress."""

    @abc.abstractmethod
    def broadcast_state(self) -> None:
        """Make every rank's model and optimizer equal to rank 0's."""

    @abc.abstractmethod
    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``fn(state)`` wrapped in Horovod's elastic retry loop for this framework."""


class HorovodProcess:
    """Rank, size and object collectives, identical in ``horovod.torch`` and ``horovod.tensorflow``.

    Mixed into an adapter that sets ``self.hvd`` to the framework's Horovod module in ``init``.
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
