"""Turning sample ids into torch batches: fast indexing for arrays, collation for a Dataset.

Example::

    source = TorchData.of((x_numpy, y_numpy))
    x, y = source.batch(np.array([3, 1, 4]))
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..errors import HvdkitError


class TorchData:
    """A map-style dataset as the trainer sees it: a length and a ``batch(ids)``."""

    def __init__(self, length: int, fetch):
        self.length = length
        self._fetch = fetch

    def __len__(self) -> int:
        return self.length

    def batch(self, ids: np.ndarray):
        return self._fetch(ids)

    @classmethod
    def of(cls, data: Any) -> "TorchData":
        """Accept a TorchData, a tuple/list of equally long arrays or tensors, or a torch Dataset."""
        if isinstance(data, cls):
            return data
        if isinstance(data, (str, bytes, os.PathLike)):   # a str has __getitem__ and __len__: not a Dataset
            raise HvdkitError(f"cannot use the path {os.fsdecode(data)!r} as a dataset; load it first and pass "
                              "(features, labels) arrays or a map-style torch Dataset")
        if isinstance(data, (tuple, list)) and data and all(hasattr(d, "shape") for d in data):
            tensors = [torch.as_tensor(np.ascontiguousarray(d)) if isinstance(d, np.ndarray) else d for d in data]
            lengths = {len(t) for t in tensors}
            if len(lengths) != 1:
                raise HvdkitError(f"the arrays of one dataset have different lengths {sorted(lengths)}; "
                                  "features and labels must match")
            return cls(lengths.pop(), lambda ids: tuple(t[torch.from_numpy(ids)] for t in tensors))
        if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            from torch.utils.data import default_collate
            return cls(len(data), lambda ids: default_collate([data[int(i)] for i in ids]))
        raise HvdkitError(f"cannot use a {type(data).__name__} as a dataset; pass (features, labels) arrays "
                          "or a map-style torch Dataset")
