"""The PyTorch side: adapter (model and optimizer), feed (data to tensors), process (Horovod or local).
Importing this imports torch; Horovod is imported only when a ``HorovodProcess`` starts.

Example::

    from hvdkit.torch import TorchAdapter
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.functional.cross_entropy)
"""
from .adapter import TorchAdapter
from .data import TorchData
from .feed import TorchFeed
from .process import HorovodProcess, LocalProcess
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["TorchAdapter", "TorchData", "TorchFeed", "HorovodProcess", "LocalProcess", "SyncBatchNorm",
           "convert_sync_batchnorm"]
