"""The TensorFlow / Keras 3 adapters, on Horovod's plain TF collectives.

Horovod 0.28.1's own Keras helpers break on Keras 3 (its DistributedOptimizer silently stops
averaging; BroadcastGlobalVariablesCallback and DistributedGradientTape raise): these adapters
use ``horovod.tensorflow`` allreduce/broadcast on the variables instead.

- :class:`KerasFitAdapter`: a compiled model trained by Keras' own ``model.fit``.
- :class:`KerasAdapter`: hvdkit's ``tf.GradientTape`` step inside ``tf.function``.
- ``feed``: numpy arrays or tf.data sources (:class:`TFStream`, :class:`TFFiles`) split by rank;
  ``process``: Horovod's TF collectives (:class:`HorovodProcess`) or none at world size 1 (:class:`LocalProcess`).

Importing this imports TensorFlow without its native log lines (``HVDKIT_TF_LOGS=1`` shows them) and sizes
TF's thread pools to ``HVDKIT_THREADS`` (default 1): import it before running any TensorFlow op.

Example::

    from hvdkit.keras import KerasFitAdapter
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy())
    Trainer(KerasFitAdapter(model), TrainConfig(epochs=5)).fit((x, y), (x_test, y_test))
"""
import os

from ..tuning import threads_from_env

threads_from_env()   # a bad HVDKIT_THREADS: one line (HvdkitError) before TensorFlow starts, not a traceback

from .quiet import native_stderr_silenced  # noqa: E402

_show_logs = os.environ.get("HVDKIT_TF_LOGS") == "1"
if not _show_logs:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
with native_stderr_silenced(enabled=not _show_logs):
    import horovod.tensorflow  # noqa: F401,E402
    import keras  # noqa: F401,E402
    import tensorflow  # noqa: F401,E402

from .threads import pin_threads  # noqa: E402

# TensorFlow fixes its thread pools when it runs its first op (building a model does), usually long before
# the trainer starts: so the pools are sized here, on import (HVDKIT_THREADS, default 1 per worker).
pin_threads()

from .adapter import KerasAdapter  # noqa: E402
from .data import TFFiles, TFStream  # noqa: E402
from .feed import ArrayFeed, StreamFeed, make_feed  # noqa: E402
from .fit import KerasFitAdapter  # noqa: E402
from .precision import use_precision  # noqa: E402
from .process import HorovodProcess, LocalProcess  # noqa: E402
from .sync_batchnorm import SyncBatchNormalization  # noqa: E402


def make_adapter(model, optimizer, loss, mode: str = "fit", compression: str = "none", metrics=()):
    """``mode="fit"``: compile ``model`` and train with Keras' ``model.fit``; ``"loop"``: hvdkit's tf.function step.

    metrics: ``keras.metrics.Metric`` objects, compiled into the model (fit) or given to the loop adapter by their
    names; evaluation reports each as ``<name>`` either way, exact over every rank's share."""
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics) or None)
        return KerasFitAdapter(model, compression=compression)
    if mode == "loop":
        return KerasAdapter(model, optimizer, loss, compression=compression, metrics={m.name: m for m in metrics})
    from ..errors import HvdkitError
    raise HvdkitError(f"unknown Keras mode {mode!r}; use fit or loop")


__all__ = ["KerasAdapter", "KerasFitAdapter", "TFFiles", "TFStream", "make_adapter", "ArrayFeed", "StreamFeed",
           "make_feed", "HorovodProcess", "LocalProcess", "SyncBatchNormalization", "use_precision"]
