"""Keras 3 BatchNormalization whose training statistics span every rank's samples, on Horovod's TF allreduce.

Horovod's ``hvd.SyncBatchNormalization`` does not work on Keras 3 (it passes ``fused=False``, which Keras 3's
BatchNormalization rejects), and Keras' own ``synchronized=True`` needs a tf.distribute strategy. This layer
overrides only how the batch moments are computed: per channel, each rank's sum, sum of squares and count
(float64) are summed over ranks in one allreduce (differentiable: its gradient is an allreduce too). A rank
with no samples in a step calls it on a stand-in row (:mod:`hvdkit.keras.standin`) and adds zeros; with no
sample on any rank the moving statistics stand in. Without Horovod running (``LocalProcess``) it is
:class:`EmptySafeBatchNormalization`.

Example::

    layer = SyncBatchNormalization()              # in a model you build
    make_sync_batchnorm(model)                    # or: every BatchNormalization of a built model
"""
from __future__ import annotations

import keras
import tensorflow as tf

from . import standin


def _horovod():
    """horovod.tensorflow once initialised (any world size: a graph traced at one worker must still hold the
    collective when an elastic job grows), else None."""
    try:
        import horovod.tensorflow as hvd
        return hvd if hvd.is_initialized() else None
    except (ImportError, ValueError):
        return None


@keras.saving.register_keras_serializable(package="hvdkit")
class EmptySafeBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that leaves its moving statistics alone on a training batch that must not count: a
    stand-in row (:mod:`hvdkit.keras.standin`), or an empty batch (Keras' own folds its NaN moments into them).
    Keras ``fit`` trains a rank without samples in the short last step on a stand-in, so the fit adapter gives
    every plain BatchNormalization this behaviour."""

    def _moments(self, inputs, mask):
        mean, variance = super()._moments(inputs, mask)
        any_sample = tf.logical_and(tf.size(inputs) > 0, tf.logical_not(standin.flag()))
        return tf.cond(any_sample, lambda: (mean, variance), lambda: self._moving_moments(mean.dtype))

    def _moving_moments(self, dtype):
        """The moving statistics as this batch's moments: Keras' update then leaves them where they are."""
        return tf.cast(self.moving_mean, dtype), tf.cast(self.moving_variance, dtype)


@keras.saving.register_keras_serializable(package="hvdkit")
class SyncBatchNormalization(EmptySafeBatchNormalization):
    """Drop-in for ``keras.layers.BatchNormalization`` (no masks, no renorm)."""

    #: Part of the collective's name: the same on every rank. make_sync_batchnorm numbers layers in model
    #: order; a layer built directly falls back to its Keras name (per-process counters: build alike everywhere).
    collective_index = None

    def _moments(self, inputs, mask):
        hvd = _horovod()
        if hvd is None:  # no Horovod (LocalProcess): one rank, a stand-in or empty batch counting for nothing
            return super()._moments(inputs, mask)
        if mask is not None or self.renorm:
            raise ValueError("SyncBatchNormalization supports neither masks nor renorm")
        axes = self._reduction_axes
        x = tf.cast(inputs, tf.float64)
        count = tf.cast(tf.size(x), tf.float64) / tf.cast(tf.maximum(tf.size(tf.reduce_sum(x, axes)), 1), tf.float64)
        local = tf.concat([tf.reshape(tf.reduce_sum(x, axes), [-1]), tf.reshape(tf.reduce_sum(x * x, axes), [-1]),
                           tf.reshape(count, [1])], 0) * standin.keep(tf.float64)   # a stand-in row adds nothing
        # The name starts with "Horovod" (a lost peer is recognised by it, see hvdkit.keras.process) and is the
        # layer's own: ranks running this in different step graphs still pair up.
        tag = self.collective_index if self.collective_index is not None else self.name
        total = hvd.allreduce(local, op=hvd.Sum, name=f"HorovodAllreduce_hvdkit_sync_bn_{tag}",
                              ignore_name_scope=True)
        channels = tf.size(local) // 2
        n = total[-1]
        any_sample = n > 0   # no sample on any rank (an accumulation micro-batch idle everywhere): moving statistics
        mean = total[:channels] / tf.maximum(n, 1.0)   # no 0/0: a NaN would reach the gradient through the where
        variance = tf.maximum(total[channels:2 * channels] / tf.maximum(n, 1.0) - mean * mean, 0.0)
        shape = tf.shape(tf.reduce_sum(tf.cast(inputs, tf.float32), axes, keepdims=False))
        mean, variance = (tf.cast(tf.reshape(v, shape), inputs.dtype) for v in (mean, variance))
        moving_mean, moving_variance = self._moving_moments(inputs.dtype)
        return tf.where(any_sample, mean, moving_mean), tf.where(any_sample, variance, moving_variance)


def make_sync_batchnorm(model: keras.Model) -> int:
    """Turn every BatchNormalization layer of ``model`` (built or not) into a :class:`SyncBatchNormalization`,
    keeping its variables; returns how many. A built Keras model cannot swap a layer for another object, so
    the layer's class changes in place (the subclass adds no state)."""
    layers = _swap_plain_batchnorm(model, SyncBatchNormalization)
    for index, layer in enumerate(layers):
        layer.collective_index = index
    return len(layers)


def _swap_plain_batchnorm(model: keras.Model, cls) -> list:
    """Every plain BatchNormalization layer of ``model``, in model order, its class changed to ``cls``."""
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if type(layer) is keras.layers.BatchNormalization]
    for layer in layers:
        layer.__class__ = cls
    return layers


def make_empty_safe_batchnorm(model: keras.Model) -> int:
    """Every plain BatchNormalization of ``model`` as an :class:`EmptySafeBatchNormalization` (class changed in
    place, as in :func:`make_sync_batchnorm`); returns how many."""
    return len(_swap_plain_batchnorm(model, EmptySafeBatchNormalization))
