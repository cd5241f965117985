"""The TensorFlow / Keras 3 adapter, on Horovod's plain TF collectives.

Horovod 0.28.1's own Keras helpers break on Keras 3 (its DistributedOptimizer silently stops
averaging; BroadcastGlobalVariablesCallback and DistributedGradientTape raise): this adapter
uses ``horovod.tensorflow`` allreduce/broadcast on the variables instead. Importing it imports
tensorflow (quietly: TF's C++ log lines are off unless TF_CPP_MIN_LOG_LEVEL is set).

Example::

    from hvdkit.keras import KerasAdapter
    adapter = KerasAdapter(model, keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy())
    Trainer(adapter, TrainConfig(epochs=5)).fit((x, y), (x_test, y_test))
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .adapter import KerasAdapter  # noqa: E402

__all__ = ["KerasAdapter"]
