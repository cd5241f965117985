"""Shard arithmetic: which samples each rank trains and evaluates on. Pure numpy, no framework.

Every function takes ``rank`` and ``world_size`` as plain arguments, so a test can simulate every
rank in one process.

Training order. Each epoch has one global permutation of the ``n`` sample ids, drawn from
``(seed, epoch)`` so that all ranks compute the same one without communicating, and a different
one every epoch. The epoch is cut into optimizer steps of ``G = world_size * batch_size *
accumulation`` consecutive ids; inside a step, micro-batch ``j`` is split over the ranks as
evenly as possible. So 2 ranks with batch ``b`` see, step for step, the same samples as 1 rank
with batch ``2b``.

The remainder. The last step of an epoch holds ``n mod G`` samples; they are still trained on
(no sample is dropped and none is repeated), split evenly, so in that step some ranks may hold
fewer samples, or none. Every rank still runs the same number of steps and joins every
allreduce; :attr:`Step.weights` tell the adapter how to scale each rank's loss so that the
averaged gradient is the exact mean over the samples of the step (a rank with no samples
contributes a zero gradient).

Resuming. ``start`` is the number of samples of this epoch already trained on; the rest of the
permutation is re-split over the current world size, which is what makes resizes exactly-once.

Example::

    >>> plan = plan_epoch(10, rank=1, world_size=2, batch_size=2, seed=0, epoch=0)
    >>> len(plan), sum(len(m) for s in plan for m in s.micro_batches)
    (3, 5)
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np

from .errors import HvdkitError

__all__ = ["Step", "epoch_permutation", "plan_epoch", "steps_per_epoch", "eval_indices",
           "shard_files", "check_train_config", "even_sizes", "stream_plan", "stream_consumed",
           "Segment", "stream_segments"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One optimizer step on one rank.

    micro_batches: this rank's sample ids, one array per backward pass (``accumulation`` of them).
    weights: per micro-batch, ``samples_here * world_size / samples_in_step``; multiplying a mean
        loss by it makes Horovod's average over ranks the exact mean over the whole step.
    samples_in_step: samples in this step over all ranks (the same number on every rank).
    end: position in the epoch's permutation after this step (what a checkpoint records).
    """
    micro_batches: List[np.ndarray]
    weights: List[float]
    samples_in_step: int
    end: int


def check_train_config(n: int, world_size: int, batch_size: int, accumulation: int = 1) -> None:
    """Raise :class:`HvdkitError` (on every rank alike, before any collective) for unusable input."""
    if batch_size is None or int(batch_size) < 1:
        raise HvdkitError(f"batch_size must be >= 1 (got {batch_size}); pass e.g. --batch-size 32")
    if int(accumulation) < 1:
        raise HvdkitError(f"gradient accumulation must be >= 1 (got {accumulation})")
    if n == 0:
        raise HvdkitError("the training dataset is empty; check the data path or the split")
    if n < world_size:
        raise HvdkitError(
            f"the training dataset has {n} samples but there are {world_size} workers, so some rank "
            f"would get no data at all; use at most {n} workers or more data")


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch; identical on every rank, different every epoch."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    # SeedSequence mixes (seed, epoch) well: nearby seeds or epochs give unrelated orders.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(n).astype(np.int64)


def steps_per_epoch(n: int, world_size: int, batch_size: int, accumulation: int = 1, start: int = 0) -> int:
    """How many optimizer steps every rank runs for the samples ``start..n`` of an epoch."""
    per_step = world_size * batch_size * accumulation
    return -(-(n - start) // per_step)


def _even_split(ids: np.ndarray, world_size: int, rank: int) -> np.ndarray:
    # np.array_split semantics (the first ranks get the extra ones), without splitting everything.
    q, r = divmod(len(ids), world_size)
    lo = rank * q + min(rank, r)
    return ids[lo:lo + q + (1 if rank < r else 0)]


def plan_epoch(n: int, rank: int, world_size: int, batch_size: int, seed: int, epoch: int,
               accumulation: int = 1, start: int = 0, shuffle: bool = True) -> List[Step]:
    """This rank's optimizer steps for samples ``start..n`` of ``epoch`` (see the module doc)."""
    check_train_config(n, world_size, batch_size, accumulation)
    if not 0 <= start <= n:
        raise HvdkitError(f"resume position {start} is outside an epoch of {n} samples; the checkpoint "
                          "does not belong to this dataset")
    perm = epoch_permutation(n, seed, epoch, shuffle)
    micro = world_size * batch_size
    steps = []
    pos = start
    while pos < n:
        step_ids = perm[pos:pos + micro * accumulation]
        total = len(step_ids)
        batches, weights = [], []
        for j in range(accumulation):
            chunk = step_ids[j * micro:(j + 1) * micro]
            mine = _even_split(chunk, world_size, rank)
            batches.append(mine)
            weights.append(len(mine) * world_size / total)
        pos += total
        steps.append(Step(batches, weights, total, pos))
    return steps


def smallest_share(n: int, world_size: int, batch_size: int, accumulation: int = 1, start: int = 0) -> int:
    """The smallest non-zero number of samples any rank gets in one backward pass of :func:`plan_epoch` for
    samples ``start..n`` (only the short last step can hold fewer than ``batch_size``)."""
    micro = world_size * batch_size
    rest = (n - start) % (micro * accumulation)
    if start >= n:
        return batch_size
    shares = [batch_size] if n - start >= micro else []
    for _ in range(accumulation):
        chunk, rest = min(rest, micro), rest - min(rest, micro)
        shares += [q for q in (chunk // world_size, -(-chunk // world_size)) if q > 0]
    return min(shares) if shares else batch_size


def eval_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's evaluation ids: a contiguous, even split with no padding, so each sample counts once.

    Ranks may hold one sample more or less (or none when ``n < world_size``); evaluation runs no
    collective per batch, only one weighted reduction at the end, so unequal counts cannot hang.
    """
    return _even_split(np.arange(n, dtype=np.int64), world_size, rank)


def shard_files(files: Sequence[str], rank: int, world_size: int, seed: int = 0, epoch: int = 0,
                shuffle: bool = False) -> List[str]:
    """Whole files for this rank: file ``i`` of the (optionally shuffled) list goes to rank ``i % world``.

    Raises when there are fewer files than workers, since a rank would read nothing.
    """
    files = list(files)
    if not files:
        raise HvdkitError("the file list is empty; check the glob or directory")
    if len(files) < world_size:
        raise HvdkitError(f"{len(files)} files for {world_size} workers: each rank reads whole files, so "
                          f"some rank would get none; split the data into at least {world_size} files")
    order = epoch_permutation(len(files), seed, epoch, shuffle)
    return [files[i] for i in order[rank::world_size]]


def even_sizes(n: int, world_size: int) -> List[int]:
    """Samples per rank when element ``i`` goes to rank ``i % world_size`` (``tf.data``'s ``shard``)."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def stream_plan(sizes: Sequence[int], rank: int, batch_size: int, start: int = 0, offset: int = 0) -> List[Step]:
    """Steps for streamed shards (a tf.data pipeline, whole files) that hold ``sizes[r]`` samples on rank r.

    A stream cannot be permuted globally, so each rank reads its own shard, shuffled locally, in
    batches of ``batch_size``. Every rank runs ``ceil(max(sizes) / batch_size)`` steps; a rank whose
    shard is used up joins the remaining steps with an empty batch (weight 0), so nothing hangs.
    Here ``micro_batches[0]`` holds positions ``0..k-1`` of this rank's next ``k`` streamed samples,
    not sample ids; weights and ``end`` follow the same rules as :func:`plan_epoch`, and ``start``
    (samples of the epoch already done, a step boundary) skips the steps before it.

    ``offset``: the shards hold what was left of the epoch after ``offset`` samples (a segment of
    :func:`stream_segments`); positions and ``end`` still count from the epoch's start. Such a
    remainder may leave some ranks with nothing to read.
    """
    world = len(sizes)
    if offset == 0:
        check_train_config(sum(sizes), world, batch_size)
        if min(sizes) == 0:
            raise HvdkitError(f"some rank would get no data at all (samples per rank: {list(sizes)}); "
                              "use fewer workers or split the data into more, smaller files")
    steps, done = [], offset
    for s in range(-(-max(sizes) // batch_size)):
        here = [min(max(size - s * batch_size, 0), batch_size) for size in sizes]
        total = sum(here)
        done += total
        if done > start:
            steps.append(Step([np.arange(here[rank], dtype=np.int64)], [here[rank] * world / total], total, done))
    if start > offset and steps and steps[0].end - steps[0].samples_in_step != start:
        raise HvdkitError(f"cannot resume a tf.data stream at sample {start}: that is not a step boundary for "
                          f"{world} workers and batch {batch_size}; resume with the batch size the run was "
                          "started with")
    return steps


def stream_consumed(sizes: Sequence[int], batch_size: int, done: int) -> List[int]:
    """Samples each rank of :func:`stream_plan` over ``sizes`` has read once ``done`` of them are trained."""
    if batch_size < 1:
        raise HvdkitError(f"batch_size must be >= 1 (got {batch_size})")
    steps = 0
    total = 0
    while total < done and steps * batch_size < max(sizes, default=0):
        total += sum(min(max(size - steps * batch_size, 0), batch_size) for size in sizes)
        steps += 1
    if total != done:
        raise HvdkitError(f"cannot resume a tf.data stream at {done} samples into a segment: not a step boundary "
                          f"for {len(sizes)} workers and batch {batch_size}; resume with the batch size the run "
                          "was started with")
    return [min(size, steps * batch_size) for size in sizes]


@dataclasses.dataclass(frozen=True)
class Segment:
    """A stretch of an epoch that ran on one world size (see :func:`stream_segments`).

    start: the epoch's position where it began; sizes: samples per rank of what was left then;
    consumed: samples per rank read before the next segment began (None for the last one).
    """
    world_size: int
    start: int
    sizes: List[int]
    consumed: Optional[List[int]]


def stream_segments(first_sizes: Sequence[int], layout: Sequence[Sequence[int]], batch_size: int) -> List[Segment]:
    """The shards of an epoch of a stream that changed world size mid-epoch, segment by segment.

    ``layout`` lists ``[world_size, start]`` per segment: ``[[2, 0], [3, 640]]`` means 2 workers
    began the epoch and 3 took over at sample 640. Segment 0 holds ``first_sizes`` (the source's
    own split over ``layout[0][0]`` ranks). Each later segment splits what the previous one left
    (every old rank's shuffled shard minus what it consumed, concatenated in rank order) element
    ``i`` to new rank ``i % world``, so every sample of the epoch is read exactly once overall.

    Example::

        >>> [s.sizes for s in stream_segments([5, 5], [[2, 0], [3, 4]], batch_size=2)]
        [[5, 5], [2, 2, 2]]
    """
    if not layout or layout[0][1] != 0:
        raise HvdkitError(f"a stream layout must start at sample 0 (got {list(layout)})")
    segments, sizes = [], list(first_sizes)
    for i, (world, start) in enumerate(layout):
        if len(sizes) != world:
            raise HvdkitError(f"segment {i} of the layout has {world} workers but {len(sizes)} shards")
        consumed = None
        if i + 1 < len(layout):
            consumed = stream_consumed(sizes, batch_size, layout[i + 1][1] - start)
        segments.append(Segment(int(world), int(start), sizes, consumed))
        if consumed is not None:
            sizes = even_sizes(sum(sizes) - sum(consumed), layout[i + 1][0])
    return segments
