"""The feed role: a dataset as the trainer sees it — its length, each epoch's step plan, the batches for
those steps, and this rank's evaluation share. Framework-free here; ``hvdkit.torch.feed`` and
``hvdkit.keras.feed`` turn sample ids into tensors. A feed hands batches to the adapter and never calls it.

Rank and world size are plain arguments, so a unit test can play every rank in one process.

Example::

    feed = TorchFeed.of((x, y))
    steps = feed.plan(epoch=0, start=0, config=cfg, rank=0, size=2)
    for step, micro_batches in feed.step_batches(steps, rank=0, size=2):
        loss_sum, count = adapter.train_step(micro_batches)
"""
from __future__ import annotations

import abc
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .sharding import Step, eval_indices, plan_epoch, smallest_share


class MicroBatch(NamedTuple):
    """One backward pass on one rank: ``count`` samples whose mean loss is multiplied by ``weight``.

    ``count == 0`` (a rank with nothing left in the short last step, or an empty accumulation micro-batch):
    ``inputs``/``targets`` are a batch that must not count (:meth:`IndexedFeed.idle_batch`): zero rows of the
    right shape, or for Keras one stand-in row (or None where the source cannot make one); the adapter still
    joins the step's collectives with a zero gradient.
    """
    inputs: Any
    targets: Any
    weight: float
    count: int


class Feed(abc.ABC):
    """A training or evaluation dataset of ``n`` samples, split over ranks."""

    n: int
    #: Set by the trainer in audit mode: steps must then name their sample ids (a tf.data stream under
    #: Keras ``fit`` pays a second read of its input for them).
    record_ids: bool = False

    def __len__(self) -> int:
        return self.n

    @abc.abstractmethod
    def plan(self, epoch: int, start: int, config, rank: int, size: int,
             layout: Optional[Sequence[Sequence[int]]] = None) -> List[Step]:
        """This rank's steps of ``epoch`` from sample ``start`` on; the same count on every rank.

        layout: ``[world_size, start]`` of each stretch of this epoch (``sharding.stream_segments``); inputs
        permuted globally ignore it, since the rest of the permutation is simply re-split.
        """

    def smallest_batch(self, config, size: int, start: int) -> Optional[int]:
        """The fewest samples (> 0) any rank gets in one backward pass from ``start`` on; None if unknown."""
        return None

    @abc.abstractmethod
    def step_batches(self, steps: List[Step], rank: int, size: int) -> Iterator[Tuple[Step, List[MicroBatch]]]:
        """Per step of ``steps`` (from :meth:`plan`), the step naming its sample ids and its micro-batches."""

    @abc.abstractmethod
    def eval_batches(self, rank: int, size: int, batch_size: int) -> Iterator[Tuple[Any, Any]]:
        """``(inputs, targets)`` of this rank's unpadded evaluation share; each sample on exactly one rank."""


class IndexedFeed(Feed):
    """A map-style dataset: any sample by its id, so each epoch is one global permutation re-split on resizes.

    Subclasses implement :meth:`fetch`.
    """

    def __init__(self, n: int):
        self.n = int(n)

    @abc.abstractmethod
    def fetch(self, ids: np.ndarray) -> Tuple[Any, Any]:
        """``(inputs, targets)`` of the samples ``ids`` (a non-empty int64 array)."""

    def plan(self, epoch, start, config, rank, size, layout=None):
        return plan_epoch(self.n, rank, size, config.batch_size, config.seed, epoch, config.accumulation,
                          start=start, shuffle=config.shuffle)

    def smallest_batch(self, config, size, start):
        return smallest_share(self.n, size, config.batch_size, config.accumulation, start)

    def empty_batch(self) -> Tuple[Any, Any]:
        """``(inputs, targets)`` with zero samples: sample 0's batch cut to length 0 (shapes and dtypes kept)."""
        if not hasattr(self, "_empty"):
            self._empty = tuple(_cut_to_empty(part) for part in self.fetch(np.zeros(1, dtype=np.int64)))
        return self._empty

    def idle_batch(self) -> Tuple[Any, Any]:
        """What a micro-batch with no sample runs on: :meth:`empty_batch` here (a framework whose kernels
        mishandle zero rows gives a stand-in row instead: hvdkit.keras.feed.ArrayFeed)."""
        return self.empty_batch()

    def step_batches(self, steps, rank, size):
        for step in steps:
            yield step, [MicroBatch(*self.fetch(ids), weight, len(ids)) if len(ids) else
                         MicroBatch(*self.idle_batch(), weight, 0)
                         for ids, weight in zip(step.micro_batches, step.weights)]

    def eval_batches(self, rank, size, batch_size):
        ids = eval_indices(self.n, rank, size)
        for lo in range(0, len(ids), batch_size):
            yield self.fetch(ids[lo:lo + batch_size])


def _cut_to_empty(part):
    """``part[:0]`` through tuples, lists and dicts (a collated batch may be nested)."""
    if isinstance(part, dict):
        return {k: _cut_to_empty(v) for k, v in part.items()}
    if isinstance(part, (tuple, list)):
        return type(part)(_cut_to_empty(v) for v in part)
    return part[:0] if hasattr(part, "shape") else part
