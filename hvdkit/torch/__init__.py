"""The PyTorch adapter. Importing this imports torch and horovod.torch.

Example::

    from hvdkit.torch import TorchAdapter
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.functional.cross_entropy)
"""
from .adapter import TorchAdapter
from .data import TorchData

__all__ = ["TorchAdapter", "TorchData"]
