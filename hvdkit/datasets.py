"""Real data that ships inside an installed package (no downloads): scikit-learn's 8x8 digits.

Example::

    x_train, y_train, x_test, y_test = digits_split()
    x_train.shape, x_test.shape      # ((1437, 64), (360, 64))
"""
from __future__ import annotations

import numpy as np

from .errors import HvdkitError

DIGITS_TEST_SIZE = 360


def digits_split(test_size: int = DIGITS_TEST_SIZE, split_seed: int = 1234, images: bool = False):
    """1,797 handwritten digits (10 classes), scaled to [0, 1], split the same way on every rank.

    images: return ``(N, 8, 8, 1)`` arrays instead of flat 64-vectors.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise HvdkitError("scikit-learn is needed for the digits data; pip install 'hvdkit[data]'") from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    if images:
        x = x.reshape(-1, 8, 8, 1)
    order = np.random.default_rng(split_seed).permutation(len(x))
    test, train = order[:test_size], order[test_size:]
    return x[train], y[train], x[test], y[test]


def synthetic_images(n: int, shape=(28, 28, 1), classes: int = 10, seed: int = 0):
    """Random images with learnable labels (class = brightest quadrant-ish), for throughput runs."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    y = (x.reshape(n, -1)[:, :classes].argmax(axis=1)).astype(np.int64)
    return x, y
