"""TensorFlow's compute thread pools: sized before TF starts, checked when training starts.

TF reads its intra-/inter-op thread counts once, when it runs its first op; afterwards setting them raises.
Building a Keras model runs ops, so a count set by the trainer would come too late (and an ignored error
would leave TF on every core, competing with the other workers on the host).

Example::

    pin_threads()                 # on ``import hvdkit.keras``: HVDKIT_THREADS, default 1
    check_threads(1)              # when training starts: the counts TF really runs with, or one clear error
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf

from ..errors import HvdkitError
from ..tuning import threads_from_env


def pin_threads(threads: Optional[int] = None) -> bool:
    """Size TF's pools to ``threads`` (default $HVDKIT_THREADS or 1); False when TF has already started."""
    threads = threads or threads_from_env()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        return True
    except RuntimeError:
        return False


def check_threads(threads: int) -> None:
    """Set ``threads`` if TF has not started yet; otherwise fail unless TF already runs with exactly that many."""
    if pin_threads(threads):
        return
    running = (tf.config.threading.get_intra_op_parallelism_threads(),
               tf.config.threading.get_inter_op_parallelism_threads())
    if running != (threads, threads):
        shown = "/".join(str(t) if t else "all cores" for t in running)
        raise HvdkitError(f"TensorFlow already runs with {shown} intra/inter-op threads, not the {threads} asked: it "
                          f"fixes them at its first op; import hvdkit.keras before running any TensorFlow op (it sets "
                          f"HVDKIT_THREADS, default 1), or set HVDKIT_THREADS={threads} before starting")
