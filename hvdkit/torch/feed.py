"""The feed role for PyTorch: sample ids to ``(inputs, targets)`` tensors.

Example::

    feed = TorchFeed.of((x_numpy, y_numpy))          # or a map-style torch Dataset
    inputs, targets = feed.fetch(np.array([3, 1, 4]))
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..feed import Feed, IndexedFeed
from .data import TorchData


class TorchFeed(IndexedFeed):
    """A map-style dataset (arrays, tensors or a torch ``Dataset``) sharded by the global permutation."""

    def __init__(self, source: TorchData):
        super().__init__(len(source))
        self.source = source

    @classmethod
    def of(cls, data: Any) -> Feed:
        return data if isinstance(data, Feed) else cls(TorchData.of(data))

    def fetch(self, ids: np.ndarray):
        return self.source.batch(ids)
