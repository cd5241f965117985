"""The process role for TensorFlow / Keras 3: Horovod's plain TF collectives, or none at world size 1.

Besides the trainer's collectives the Keras adapters ask their process for the gradient allreduce
(inside a ``tf.function`` step), the variable broadcast, and whether an error means a lost peer.

Horovod 0.28.1's Keras helpers break on Keras 3, so this works on the ``tf.Variable``s under Keras'
variables, and has its own elastic wrapper (see :func:`is_peer_lost`).

Example::

    process = HorovodProcess()
    process.init(seed=0, threads=1)
    reduced = process.allreduce_gradients(grads, compression="none")   # inside tf.function
"""
from __future__ import annotations

from typing import Any, Callable, List

import keras
import numpy as np
import tensorflow as tf

from .. import process as core
from ..tuning import apply_defaults
from .threads import check_threads

# Horovod pairs collectives across ranks by name. The gradient allreduce has a fixed one: in one step a
# rank may run it from the fused graph (one micro-batch) while another runs it alone (no samples), and
# the default name derives from the graph's tensor names and would differ, which hung the job (seen here).
GRADIENT_ALLREDUCE = "HorovodGroupedAllreduce_hvdkit_gradients"
# In TF a failed Horovod op surfaces only as an OpError whose text names the failing node. Horovod's own
# op names (and GRADIENT_ALLREDUCE) start with this; tests/test_tfdata_parallel.py reads the collectives
# of the step graphs back and checks each, so a rename cannot silently turn a lost peer into a user error.
PEER_LOST_MARK = "Horovod"
# The sharded optimizer's collectives (hvdkit.keras.zero), fixed names for the same reason as GRADIENT_ALLREDUCE.
# Single-tensor forms: horovod.tensorflow's grouped_reducescatter/grouped_allgather take no name (theirs derive
# from the graph's tensor names), and one flat vector per step needs no grouping.
ZERO_REDUCESCATTER = "HorovodReducescatter_hvdkit_zero_gradients"
ZERO_ALLGATHER = "HorovodAllgather_hvdkit_zero_parameters"
ZERO_NORM = "HorovodAllreduce_hvdkit_zero_norm"
ZERO_STATE = "HorovodAllgather_hvdkit_zero_state"   # the state gathered for a commit (eager, outside the step)


def tf_variables(variables) -> List[tf.Variable]:
    """The tf.Variables under Keras 3 variables: Horovod's TF collectives need those (no ``.ref`` on Keras')."""
    return [v.value for v in variables]


def is_peer_lost(error: BaseException) -> bool:
    """True when ``error`` means a peer vanished mid-collective (roll back), False for the user's errors."""
    from horovod.common.exceptions import HorovodInternalError
    if isinstance(error, HorovodInternalError):
        return True
    return isinstance(error, tf.errors.OpError) and PEER_LOST_MARK in (error.message or "")


def _pin_and_seed(seed: int, threads: int) -> None:
    check_threads(threads)
    keras.utils.set_random_seed(seed)


def _densify(grads):
    # An Embedding's gradient is IndexedSlices (Horovod allgathers those) on a rank with samples but
    # zeros on a rank without; both must enter the same collective.
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


class HorovodProcess(core.HorovodObjects, core.Process):
    """``horovod.tensorflow``: the process a launched Keras job uses."""

    def init(self, seed: int, threads: int) -> None:
        import horovod.tensorflow as hvd
        _pin_and_seed(seed, threads)
        apply_defaults()  # hvdkit's measured Horovod settings, unless the user set them
        core.apply_stall_defaults()  # a rank stuck outside the collectives ends the job (hvdkit.process)
        hvd.init()
        self.hvd = hvd

    is_peer_lost = staticmethod(is_peer_lost)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        if self.alone():   # the sharded step's norm, each step
            return np.array(values, dtype=np.float64)
        return self.hvd.allreduce(tf.constant(np.asarray(values, dtype=np.float64)), op=self.hvd.Sum,
                                  name="hvdkit.metrics").numpy()

    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        # Not horovod.tensorflow.elastic.run: it returns None on any TF error whose message lacks
        # "HorovodAllreduce" (a failed "HorovodGroupedAllreduce" ended training silently, seen here).
        from horovod.common.elastic import run_fn
        from horovod.common.exceptions import HorovodInternalError
        hvd = self.hvd
        guarded = core.guard_rollbacks(fn, self)  # never retried forever from one commit

        def body(state):
            try:
                return guarded(state)
            except tf.errors.OpError as e:
                if is_peer_lost(e):
                    raise HorovodInternalError(e) from e
                raise

        def reset():
            hvd.shutdown()
            hvd.init()
        return run_fn(body, reset)

    # ---- for the adapters (inside tf.function) ------------------------------------------------
    def allreduce_gradients(self, grads, compression: str = "none"):
        hvd = self.hvd
        grads = _densify(grads)
        if self.alone():   # decided when the step is traced: a static job's world never changes
            return grads
        # Horovod's MPI and Gloo ops cannot reduce bfloat16: such a gradient (a bfloat16 variable; float32 ones,
        # mixed_bfloat16's included, have float32 gradients) is reduced in float32 and cast back
        low = [g.dtype == tf.bfloat16 for g in grads]
        reduced = hvd.grouped_allreduce([tf.cast(g, tf.float32) if b else g for g, b in zip(grads, low)],
                                        op=hvd.Average, name=GRADIENT_ALLREDUCE, ignore_name_scope=True,
                                        compression=hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none)
        return [tf.cast(r, tf.bfloat16) if b else r for r, b in zip(reduced, low)]

    def broadcast_variables(self, variables) -> None:
        self.hvd.broadcast_variables(tf_variables(variables), root_rank=0)

    def reducescatter_average(self, tensor, compression: str = "none", name: str = ZERO_REDUCESCATTER):
        """A 1-D float32 tensor of the same length on every rank, a multiple of the world size: averaged over ranks,
        and this rank's contiguous ``1/size`` slice of it (rank r: the r-th). Eager or inside tf.function."""
        if self.alone():
            return tensor
        hvd = self.hvd
        return hvd.reducescatter(tensor, op=hvd.Average, name=name, ignore_name_scope=True,
                                 compression=hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none)

    def allgather(self, tensor, name: str = ZERO_ALLGATHER):
        """Every rank's ``tensor`` concatenated along the first dimension, in rank order."""
        if self.alone():
            return tensor
        return self.hvd.allgather(tensor, name=name, ignore_name_scope=True)

    def allreduce_sum_tensor(self, tensor, name: str = ZERO_NORM):
        """``tensor`` summed over ranks (a tf tensor, inside tf.function too; ``allreduce_sum`` is numpy's)."""
        if self.alone():
            return tensor
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name, ignore_name_scope=True)

    def average_variables(self, variables) -> None:
        """Every variable the mean over ranks (one grouped allreduce; BatchNorm moving statistics)."""
        if variables and not self.alone():
            reduced = self.hvd.grouped_allreduce([v.value for v in variables], op=self.hvd.Average,
                                                 name="HorovodGroupedAllreduce_hvdkit_buffers")
            for v, value in zip(variables, reduced):
                v.assign(value)


class LocalProcess(core.LocalProcess):
    """World size 1 without Horovod: gradients pass through, broadcasts do nothing."""

    def init(self, seed: int, threads: int) -> None:
        _pin_and_seed(seed, threads)

    def allreduce_gradients(self, grads, compression: str = "none"):
        return _densify(grads)

    def broadcast_variables(self, variables) -> None:
        pass

    def average_variables(self, variables) -> None:
        pass

    def reducescatter_average(self, tensor, compression: str = "none", name: str = ZERO_REDUCESCATTER):
        return tensor   # one rank: the average, and the whole vector is its slice

    def allgather(self, tensor, name: str = ZERO_ALLGATHER):
        return tensor

    def allreduce_sum_tensor(self, tensor, name: str = ZERO_NORM):
        return tensor
