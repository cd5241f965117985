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
from ..sharding import Step, stream_plan, stream_segments
from .data import TFSource, one_thread_options


def make_feed(data: Any) -> Feed:
    """A Feed as is; a :class:`TFSource` as a :class:`StreamFeed`; ``(x, y)`` arrays as an :class:`ArrayFeed`."""
    if isinstance(data, Feed):
        return data
    if isinstance(data, TFSource):
        return StreamFeed(data)
    return ArrayFeed(data)


def with_ids(step: Step, ids, n: int) -> Step:
    """``step`` naming the sample ids it trains; fails if the stream disagrees with the plan (wrong n)."""
    ids = np.asarray(ids)
    if len(ids) != len(step.micro_batches[0]):
        raise HvdkitError(f"the tf.data input gave {len(ids)} examples where the plan for n={n} expects "
                          f"{len(step.micro_batches[0])}; pass the pipeline's true example count as n")
    return dataclasses.replace(step, micro_batches=[ids])


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

    def fit_input(self, steps: List[Step], rank: int, size: int,
                  accumulation: int) -> Tuple[tf.data.Dataset, Optional[Iterator]]:
        """One ``(x, y, sample_weight)`` batch per micro-batch of ``steps``; ids are in the steps already."""
        micro = [(ids, weight) for step in steps for ids, weight in zip(step.micro_batches, step.weights)]
        # One gather per epoch, then tensor slices: a Python generator per batch is 2-3x slower. A rank with
        # no sample in a (short, last) step gets an empty batch: Keras still runs the step (regularizers,
        # SyncBatchNorm's collective, the allreduce) and no stand-in sample skews BatchNorm's statistics.
        ids = np.concatenate([i for i, _ in micro])
        # Keras averages the k accumulated gradients; the plan's weights assume a sum, hence * k.
        weights = np.concatenate([np.full(len(i), w * accumulation, np.float32) for i, w in micro])
        sizes = [len(i) for i, _ in micro]
        lead = next((j for j, s in enumerate(sizes) if s != sizes[0]), len(sizes)) if sizes[0] else 0
        xs, ys = self.x[ids], self.y[ids]
        cut = lead * sizes[0]
        dataset = tf.data.Dataset.from_tensor_slices((xs[:cut], ys[:cut], weights[:cut])).batch(max(sizes[0], 1))
        for s in sizes[lead:]:  # the short (or empty) micro-batches of the last step, each its own batch
            dataset = dataset.concatenate(tf.data.Dataset.from_tensors(
                (xs[cut:cut + s], ys[cut:cut + s], weights[cut:cut + s])))
            cut += s
        return dataset.with_options(one_thread_options()), None


class StreamFeed(Feed):
    """A tf.data source split by shards; a resized epoch re-deals what every old rank had left."""

    def __init__(self, source: TFSource):
        self.source, self.n = source, source.n
        self._epoch = None  # (epoch, seed, batch_size, segments) of the last plan

    def plan(self, epoch, start, config, rank, size, layout=None):
        if config.accumulation != 1:
            raise HvdkitError("gradient accumulation is not supported with tf.data inputs yet; use "
                              "accumulation=1 or pass numpy arrays")
        layout = layout or [[size, 0]]
        if layout[-1][0] != size:
            raise HvdkitError(f"the stream layout {layout} ends with {layout[-1][0]} workers, not {size}")
        segments = stream_segments(self.source.sizes(layout[0][0]), layout, config.batch_size)
        self._epoch = (epoch, config.seed, config.batch_size, segments)
        return stream_plan(segments[-1].sizes, rank, config.batch_size, start, offset=segments[-1].start)

    def _batches(self, steps: List[Step], rank: int) -> tf.data.Dataset:
        """(x, y, weight, ids) per step of ``steps``: this rank's share in batches, then empty steps.

        An empty step is fed one real example with weight 0 (and no id), so the rank still joins the allreduce.
        """
        epoch, seed, batch_size, segments = self._epoch
        last = segments[-1]
        full = stream_plan(last.sizes, rank, batch_size, offset=last.start)
        already = sum(1 for s in full[:len(full) - len(steps)] if len(s.micro_batches[0]))
        weights = [s.weights[0] for s in steps if len(s.micro_batches[0])]
        real = self.source.segment_dataset(rank, seed, epoch, segments).batch(batch_size).skip(already)
        ds = tf.data.Dataset.zip((real, tf.data.Dataset.from_tensor_slices(tf.constant(weights, tf.float32))))
        ds = ds.map(lambda batch, w: (batch[1][0], batch[1][1], w, batch[0]))
        if len(steps) > len(weights):
            filler = self.source.rank_dataset(0, 1).take(1).batch(1)
            filler = filler.map(lambda x, y: (x, y, tf.constant(0.0), tf.zeros([0], tf.int64)))
            ds = ds.concatenate(filler.repeat(len(steps) - len(weights)))
        return ds.with_options(one_thread_options())

    def step_batches(self, steps, rank, size):
        given = 0
        for step, (x, y, weight, ids) in zip(steps, self._batches(steps, rank)):
            given += 1
            yield with_ids(step, ids, self.n), [MicroBatch(x, y, float(weight), len(ids))]
        if given != len(steps):
            raise HvdkitError(f"the tf.data input ran out after {given} of {len(steps)} steps; pass the "
                              f"pipeline's true example count as n (got n={self.n})")

    def fit_input(self, steps, rank, size, accumulation):
        """``(x, y, sample_weight)`` per step; with ``record_ids`` also an iterator of each step's ids
        (read by a second pass over the input: Keras' loop hides its batches)."""
        batches = self._batches(steps, rank)
        # the weight-0 filler of an empty step cut to zero rows (its ids are empty): see ArrayFeed.fit_input
        dataset = batches.map(lambda x, y, w, ids: (x[:tf.shape(ids)[0]], y[:tf.shape(ids)[0]],
                                                    tf.fill([tf.shape(ids)[0]], w)))
        ids = iter(batches.map(lambda x, y, w, ids: ids)) if self.record_ids else None
        return dataset, ids

    def eval_batches(self, rank, size, batch_size):
        for x, y in self.source.rank_dataset(rank, size).batch(batch_size):  # unshuffled, each example once
            yield x, y
