"""The feed role for Keras: numpy arrays by sample id, or a tf.data source (``TFStream``, ``TFFiles``) by shard.

Both give the loop adapter micro-batches per step, and ``model.fit`` one tf.data input per epoch. The
stream's bookkeeping (which stretch of the epoch ran on which world size) lives here, set by ``plan``.

Example::

    feed = make_feed((x, y))                     # or make_feed(TFStream(dataset, n=1437))
    steps = feed.plan(0, 0, cfg, rank, size)
    dataset, ids = feed.fit_input(steps, rank, size, accumulation=1)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from ..errors import HvdkitError
from ..feed import Feed, IndexedFeed, MicroBatch
from ..log import get_logger
from ..sharding import Step, stream_plan, stream_segments
from .data import TFSource, one_thread_options

try:  # a verdict every rank reaches alike: the trainer passes it on as it is (no rank blamed, nothing shut down)
    from ..errors import StoppedOnEveryRank as SameOnEveryRank
except ImportError:  # an hvdkit without that distinction
    SameOnEveryRank = HvdkitError


def make_feed(data: Any) -> Feed:
    """A Feed as is; a :class:`TFSource` as a :class:`StreamFeed`; ``(x, y)`` arrays as an :class:`ArrayFeed`."""
    if isinstance(data, Feed):
        return data
    if isinstance(data, TFSource):
        return StreamFeed(data)
    return ArrayFeed(data)


def with_ids(step: Step, ids, n: int) -> Step:
    """``step`` naming the sample ids it trains.

    A stream whose true count differs from ``n`` may give fewer ids than the plan (the stand-in row, with no
    id, fills in for missing examples); the step still runs on every rank, and the epoch's end reports the
    wrong count (:meth:`StreamFeed.check_tally`) with the same error on every rank.
    """
    return dataclasses.replace(step, micro_batches=[np.asarray(ids)])


def conform(batches: tf.data.Dataset, planned: int, batch_size: int, idle, tally: tf.Variable) -> tf.data.Dataset:
    """The ``ceil(planned / batch_size)`` batches a plan for ``planned`` examples expects, whatever ``batches``
    (``(ids, (x, y))`` of ``batch_size``, the last maybe short) really holds; count its examples on the way.

    A wrong declared count must not make one rank run more or fewer steps than the others (they would wait
    in a collective for it): examples past ``planned`` are read but dropped, missing batches replaced by
    ``idle`` (no id, the stand-in row). The last planned batch is only given out once ``batches`` ran out, so
    by the end of the epoch ``tally`` holds ``[examples found, 1]`` even under Keras' ``fit``, which stops
    pulling after the last step: the price is reading the tail after this rank's share (a few examples when the
    count is right), not a second pass. Per batch, not per example: a scan over examples cost ~100 us each here.
    """
    k = -(-planned // batch_size)
    last = planned - (k - 1) * batch_size
    end = tf.data.Dataset.from_tensors((idle, tf.constant(True)))
    tagged = batches.map(_not_end, num_parallel_calls=1).concatenate(end)
    k_t, last_t = tf.constant(k, tf.int64), tf.constant(last, tf.int32)

    def step(state, element):
        count, index, held = state
        batch, is_end = element
        real = tf.logical_not(is_end)
        give = tf.logical_and(real, index < k_t - 1)            # batches before the last planned one: out at once
        hold = tf.logical_and(real, tf.equal(index, k_t - 1))   # the last planned one, cut to its size: kept
        release = tf.logical_and(is_end, index >= k_t)           # ... until the input ran out
        held = tf.cond(hold, lambda: tf.nest.map_structure(lambda t: t[:last_t], batch), lambda: held)
        out = tf.cond(release, lambda: held, lambda: batch)
        count += tf.where(is_end, tf.constant(0, tf.int64), tf.shape(batch[0], out_type=tf.int64)[0])
        index += tf.where(is_end, tf.constant(0, tf.int64), tf.constant(1, tf.int64))
        with tf.control_dependencies([tally.assign(tf.stack([count, tf.cast(is_end, tf.int64)]))]):
            emit = tf.identity(tf.logical_or(give, release))
        return (count, index, held), (out, emit)

    zero = tf.constant(0, tf.int64)
    out = tagged.scan((zero, zero, idle), step).filter(_emitted).map(_batch, num_parallel_calls=1)
    return out.concatenate(tf.data.Dataset.from_tensors(idle).repeat()).take(k)


def _not_end(ids, xy):
    return (ids, xy), tf.constant(False)


def _emitted(batch, emit):
    return emit


def _batch(batch, emit):
    return batch


class ArrayFeed(IndexedFeed):
    """``(features, labels)`` numpy arrays, sharded by the global permutation."""

    def __init__(self, data):
        if not (isinstance(data, (tuple, list)) and data and all(hasattr(d, "shape") for d in data)):
            raise HvdkitError(f"cannot use a {type(data).__name__} as a dataset here; pass (features, labels) "
                              "numpy arrays (for tf.data use hvdkit.keras.TFStream or TFFiles)")
        if len({len(d) for d in data}) != 1:
            raise HvdkitError("the arrays of one dataset have different lengths; features and labels must match")
        self.x, self.y = (np.asarray(d) for d in data[:2])
        super().__init__(len(self.x))

    def fetch(self, ids: np.ndarray):
        return self.x[ids], self.y[ids]

    def idle_batch(self):
        """The first sample whose features and labels are all finite, as a one-row stand-in
        (:mod:`hvdkit.keras.standin`: TF's oneDNN kernels mishandle zero rows). Finite because weight 0 cannot hide
        a NaN: it would reach the gradients through the backward pass and fail the step on every rank."""
        if not hasattr(self, "_stand_in"):
            self._stand_in = self.fetch(np.array([_first_finite(self.x, self.y)], dtype=np.int64))
        return self._stand_in

    def fit_input(self, steps: List[Step], rank: int, size: int,
                  accumulation: int) -> Tuple[tf.data.Dataset, Optional[Iterator]]:
        """One ``(x, y, sample_weight)`` batch per micro-batch of ``steps``; ids are in the steps already."""
        micro = [(ids, weight) for step in steps for ids, weight in zip(step.micro_batches, step.weights)]
        # One gather per epoch, then tensor slices: a Python generator per batch is 2-3x slower. A rank with
        # no sample in a (short, last) step gets the stand-in row with weight 0: Keras still runs the step
        # (regularizers, SyncBatchNorm's collective, the allreduce); the step hooks tell the layers it is one.
        ids = np.concatenate([i for i, _ in micro])
        # Keras averages the k accumulated gradients; the plan's weights assume a sum, hence * k.
        weights = np.concatenate([np.full(len(i), w * accumulation, np.float32) for i, w in micro])
        sizes = [len(i) for i, _ in micro]
        lead = next((j for j, s in enumerate(sizes) if s != sizes[0]), len(sizes)) if sizes[0] else 0
        xs, ys = self.x[ids], self.y[ids]
        cut = lead * sizes[0]
        dataset = tf.data.Dataset.from_tensor_slices((xs[:cut], ys[:cut], weights[:cut])).batch(max(sizes[0], 1))
        for s in sizes[lead:]:  # the short (or idle) micro-batches of the last step, each its own batch
            part = (xs[cut:cut + s], ys[cut:cut + s], weights[cut:cut + s]) if s else \
                (*self.idle_batch(), np.zeros(1, np.float32))
            dataset = dataset.concatenate(tf.data.Dataset.from_tensors(part))
            cut += s
        return dataset.with_options(one_thread_options()), None


def _first_finite(*arrays, chunk: int = 4096) -> int:
    """The first row finite in every float array of ``arrays`` (0 if there is none, or nothing is a float)."""
    floats = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
    for lo in range(0, len(arrays[0]), chunk):
        ok = np.ones(min(chunk, len(arrays[0]) - lo), bool)
        for a in floats:
            ok &= np.isfinite(a[lo:lo + chunk].reshape(len(ok), -1)).all(axis=1)
        if ok.any():
            return lo + int(np.argmax(ok))
    return 0


class StreamFeed(Feed):
    """A tf.data source split by shards; a resized epoch re-deals what every old rank had left.

    Each rank counts what its stream really holds while the epoch runs (:func:`conform`); the trainer sums
    :meth:`epoch_tally` over ranks in its end-of-epoch allreduce and calls :meth:`check_tally`, so a wrong
    ``n`` stops every rank alike, before the epoch is committed::

        hvdkit: error: the tf.data pipeline holds 53 examples but TFStream was given n=50 (the examples past
        n were never trained); pass its true count: TFStream(dataset, n=53)
    """

    def __init__(self, source: TFSource):
        self.source, self.n = source, source.n
        self._epoch = None  # (epoch, seed, batch_size, segments) of the last plan
        self._start = 0     # where in the epoch the last plan began
        self._planned = 0   # examples this rank's stream must give from there on
        self._filler = None
        self._noted = set()
        self._verified = False  # this rank's stream held what the plan said, in an epoch read to its end
        self._tally = tf.Variable([0, 0], dtype=tf.int64, trainable=False)  # [examples found, stream ended]

    def plan(self, epoch, start, config, rank, size, layout=None):
        if config.accumulation != 1:
            raise HvdkitError("gradient accumulation is not supported with tf.data inputs yet; use "
                              "accumulation=1 or pass numpy arrays")
        layout = layout or [[size, 0]]
        if layout[-1][0] != size:
            raise HvdkitError(f"the stream layout {layout} ends with {layout[-1][0]} workers, not {size}")
        note = self.source.layout_note(layout[0][0])
        if note and rank == 0 and layout[0][0] not in self._noted:
            self._noted.add(layout[0][0])
            get_logger(rank).info(note)
        segments = stream_segments(self.source.sizes(layout[0][0]), layout, config.batch_size)
        self._epoch = (epoch, config.seed, config.batch_size, segments)
        self._start = start
        self._tally.assign([0, 0])
        return stream_plan(segments[-1].sizes, rank, config.batch_size, start, offset=segments[-1].start)

    def _filler_row(self):
        """``(id, (x, y))`` of the source's first example: the stand-in for an empty step or a missing example.
        The same read on every rank, so an input with no example at all fails on every rank alike."""
        if self._filler is None:
            first = list(self.source.rank_dataset(0, 1, ids=True).take(1))
            if not first:
                raise HvdkitError(f"the tf.data input holds no example at all but n={self.n} was declared; "
                                  "check the files or the pipeline")
            self._filler = first[0]
        return self._filler

    def _batches(self, steps: List[Step], rank: int) -> tf.data.Dataset:
        """(x, y, weight, ids) per step of ``steps``: this rank's share in batches, then empty steps.

        An empty step is fed one real example (the stand-in, :mod:`hvdkit.keras.standin`) with no id, so the
        rank still joins the allreduce; so is a batch missing from a stream shorter than its ``n``.
        """
        epoch, seed, batch_size, segments = self._epoch
        last = segments[-1]
        full = stream_plan(last.sizes, rank, batch_size, offset=last.start)
        done = sum(len(s.micro_batches[0]) for s in full[:len(full) - len(steps)])
        self._planned = sum(len(s.micro_batches[0]) for s in steps)
        weights = [s.weights[0] for s in steps if len(s.micro_batches[0])]
        filler_x, filler_y = tf.nest.map_structure(lambda t: t[None], self._filler_row()[1])
        idle = (tf.zeros([0], tf.int64), (filler_x, filler_y))   # the stand-in row, no id
        self._tally.assign([0, 0])
        rows = self.source.segment_dataset(rank, seed, epoch, segments).skip(done).batch(batch_size)
        # Once this rank's stream held exactly what the plan said (an epoch read to its end), the count is
        # right for good (the pipeline must repeat itself) and the plain batches are used: building the
        # counting pipeline costs ~150 ms of tracing per epoch here, too much for small epochs.
        real = rows if self._verified else conform(rows, self._planned, batch_size, idle, self._tally)
        ds = tf.data.Dataset.zip((real, tf.data.Dataset.from_tensor_slices(tf.constant(weights, tf.float32))))
        ds = ds.map(lambda batch, w: (batch[1][0], batch[1][1], w, batch[0]), num_parallel_calls=1)
        if len(steps) > len(weights):
            fill = tf.data.Dataset.from_tensors((filler_x, filler_y, tf.constant(0.0), tf.zeros([0], tf.int64)))
            ds = ds.concatenate(fill.repeat(len(steps) - len(weights)))
        return ds.with_options(one_thread_options())

    def epoch_tally(self) -> Tuple[int, int]:
        """``(examples declared, examples found)`` on this rank since the last :meth:`plan`, to sum over ranks.

        Equal when ``n`` is right. ``(0, 0)`` (no verdict) until this rank's stream was read to its end,
        e.g. in a run stopped after some steps (a stream that ended early always counts), and in the epochs
        after one that matched: those are not counted.
        """
        found, ended = (int(v) for v in self._tally.numpy())
        if not ended:
            return (0, 0)
        self._verified = found == self._planned
        return (self._planned, found)

    def check_tally(self, declared: float, found: float) -> None:
        """Raise, naming both counts and the fix, when the tallies summed over ranks disagree.

        Every rank gets the same sums from the same allreduce, hence the same verdict.
        """
        if int(declared) != int(found):
            raise SameOnEveryRank(self.source.wrong_count(self._start + int(found)))

    def step_batches(self, steps, rank, size):
        for step, (x, y, weight, ids) in zip(steps, self._batches(steps, rank)):
            yield with_ids(step, ids, self.n), [MicroBatch(x, y, float(weight), len(ids))]

    def fit_input(self, steps, rank, size, accumulation):
        """``(x, y, sample_weight)`` per step; with ``record_ids`` also an iterator of each step's ids
        (read by a second pass over the input: Keras' loop hides its batches)."""
        batches = self._batches(steps, rank)
        # a step without ids trains the stand-in row with weight 0 (the step hooks flag it): see ArrayFeed.fit_input
        dataset = batches.map(_with_sample_weight)
        ids = iter(batches.map(lambda x, y, w, ids: ids)) if self.record_ids else None
        return dataset, ids

    def eval_batches(self, rank, size, batch_size):
        for x, y in self.source.rank_dataset(rank, size).batch(batch_size):  # unshuffled, each example once
            yield x, y


def _with_sample_weight(x, y, weight, ids):
    """``(x, y, per-row weight)``: ``weight`` on each row with an id; the stand-in row of a batch without ids 0."""
    rows = tf.shape(ids)[0]
    return x, y, tf.fill([tf.shape(tf.nest.flatten(x)[0])[0]], tf.where(rows > 0, weight, 0.0))
