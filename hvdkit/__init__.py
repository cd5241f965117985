"""hvdkit: PyTorch and TensorFlow/Keras 3 on Horovod ring-allreduce, wired correctly.

The core (this package) imports no framework; adapters live in ``hvdkit.torch`` and
``hvdkit.keras``.

Example::

    from hvdkit import Trainer, TrainConfig
    from hvdkit.torch import TorchAdapter
    result = Trainer(TorchAdapter(model, optimizer, loss_fn), TrainConfig(epochs=3)).fit((x, y), (x_test, y_test))
"""
from .config import TrainConfig
from .errors import HvdkitError
from .launch import launch_command
from .trainer import FitResult, Trainer

__version__ = "0.1.0"
__all__ = ["Trainer", "TrainConfig", "FitResult", "HvdkitError", "launch_command"]
