"""An idle micro-batch runs the model on one weight-0 stand-in row, never on zero rows.

A rank with no sample left in a step (the short last step of an epoch, or an empty accumulation micro-batch)
still runs the model: its step holds collectives (the gradient allreduce, SyncBatchNormalization's sums)
every rank must join. TensorFlow 2.21's oneDNN kernels mishandle zero-row batches on some CPUs (seen with AMX
and AVX512-FP16): Conv1D/2D/3D and SeparableConv give a wrong shape or fail, and MaxPooling's gradient aborts
the process. So the Keras feeds give such a micro-batch one real row (for arrays the first sample whose values
are all finite, for tf.data the first example) with weight 0, and everything that could let that row count
reads :func:`flag` instead:

- the loss: weight 0, and the losses layers add while called (activity regularizers, ``add_loss``) are
  taken out (:func:`uncounted`); the weight regularizers stay, as on every micro-batch;
- SyncBatchNormalization leaves the row out of its sums; the fit path's BatchNormalization keeps its moving
  statistics (the loop runs an idle micro-batch without SyncBatchNorm with ``training=False``);
- ``model.fit``'s metrics (the running loss, compiled metrics) and the batch's logs are put back as they were
  before the stand-in batch.

Example::

    with idle():                  # the host, around one idle micro-batch's step
        step(x_one_row, y_one_row, weight=0.0)
"""
from __future__ import annotations

import contextlib

import tensorflow as tf

_FLAG = None


def flag() -> tf.Variable:
    """The process's "this micro-batch is a stand-in" switch, read inside traced steps (created once, outside
    any trace, so every graph captures the same variable)."""
    global _FLAG
    if _FLAG is None:
        with tf.init_scope():
            _FLAG = tf.Variable(False, trainable=False, name="hvdkit_standin")
    return _FLAG


def keep(dtype=tf.float32) -> tf.Tensor:
    """0 while a stand-in runs, else 1 (a multiplier for what the stand-in row must not add)."""
    return tf.cast(tf.logical_not(flag()), dtype)


@contextlib.contextmanager
def idle():
    """The flag set for the duration (two eager variable writes: only idle micro-batches pay them)."""
    flag().assign(True)
    try:
        yield
    finally:
        flag().assign(False)


def call_losses(model) -> list:
    """The losses ``model``'s layers added while last called (``add_loss``, activity regularizers): Keras 3's
    ``Layer.losses`` lists them first and one loss per trainable variable with a regularizer last."""
    losses = model.losses
    weights = sum(1 for v in model.trainable_weights if getattr(v, "regularizer", None) is not None)
    return list(losses[:len(losses) - weights])


def uncounted(model, dtype):
    """What a stand-in must not add to ``sum(model.losses)``: the call losses while :func:`flag` is set, 0
    otherwise; None for a model without call losses (then nothing reads the flag). Taken out of the sum rather
    than the sum rebuilt without them, so a micro-batch with samples adds exactly what it did before."""
    call = call_losses(model)
    if not call:
        return None
    return tf.cast(flag(), dtype) * tf.cast(tf.add_n(call), dtype)
