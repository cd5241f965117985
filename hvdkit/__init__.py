"""hvdkit: PyTorch and TensorFlow/Keras 3 on Horovod ring-allreduce, wired correctly.

The core (this package) imports no framework; adapters live in ``hvdkit.torch`` and
``hvdkit.keras``.

Example::

    from hvdkit import Trainer, TrainConfig
    from hvdkit.torch import TorchAdapter
    result = Trainer(TorchAdapter(model, optimizer, loss_fn), TrainConfig(epochs=3)).fit((x, y), (x_test, y_test))
"""
import importlib
from typing import TYPE_CHECKING

from .config import TrainConfig
from .errors import HvdkitError
from .launch import launch_command

__version__ = "0.1.0"
__all__ = ["Trainer", "TrainConfig", "FitResult", "HvdkitError", "launch_command"]

# The trainer (and numpy with it) is imported on first use: horovodrun runs
# `python -m hvdkit.discover_hosts` every second, and that must stay a standard-library start.
_LAZY = {"Trainer": ".trainer", "FitResult": ".trainer"}

if TYPE_CHECKING:
    from .trainer import FitResult, Trainer


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
