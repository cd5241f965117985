"""An idle micro-batch runs the model on one weight-0 stand-in row, never on zero rows.

A rank with no sample left in a step (the short last step of an epoch, or an empty accumulation micro-batch)
still runs the model: its step holds collectives (the gradient allreduce, SyncBatchNormalization's sums)
every rank must join. TensorFlow 2.21's oneDNN kernels mishandle zero-row batches on some CPUs (seen with AMX
and AVX512-FP16): Conv1D/2D/3D and SeparableConv give a wrong shape or fail, and MaxPooling's gradient aborts
the process. So the Keras feeds give such a micro-batch one real row (the dataset's first example) with weight
0, and everything that could let that row count reads :func:`flag` instead:

- the loss: weight 0, and the losses layers add while called (activity regularizers, ``add_loss``) are
  dropped; the weight regularizers stay, as on every micro-batch (:func:`split_losses`);
- SyncBatchNormalization leaves the row out of its sums; the fit path's BatchNormalization keeps its moving
  statistics (the loop runs an idle micro-batch without SyncBatchNorm with ``training=False``);
- ``model.fit``'s running loss mean is put back as it was before the idle batch.

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


def split_losses(model, losses) -> tuple:
    """``(call losses, weight regularization losses)`` of ``model.losses`` as given in ``losses``.

    Keras 3 lists the losses added while the layers ran (``add_loss``, activity regularizers) first and one
    loss per trainable variable with a regularizer last (``Layer.losses``)."""
    weights = sum(1 for v in model.trainable_weights if getattr(v, "regularizer", None) is not None)
    cut = len(losses) - weights
    return list(losses[:cut]), list(losses[cut:])


def counted_regularization(model, losses, dtype) -> tf.Tensor:
    """``sum(losses)`` with the call losses dropped while a stand-in runs (the flag is read only when there are
    call losses: a model without them traces no read)."""
    call, weights = split_losses(model, losses)
    total = tf.cast(tf.add_n(weights), dtype) if weights else tf.zeros((), dtype)
    if call:
        total += tf.cast(tf.add_n(call), dtype) * keep(dtype)
    return total
