"""Real data that ships inside the package (no downloads): the 8x8 handwritten digits.

``hvdkit/data/digits.npz`` is the test set of the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin
and C. Kaynak, 1998; CC BY 4.0, see data/README.md), the same 1,797 images and labels as scikit-learn's
``load_digits``: pixels are integer counts 0..16, stored as uint8. Shipped here so that the kit needs no
scikit-learn: where it is installed, Keras imports it (and SciPy) at every TensorFlow process's start, 1.5 s of CPU.

Example::

    x_train, y_train, x_test, y_test = digits_split()
    x_train.shape, x_test.shape      # ((1437, 64), (360, 64))
"""
from __future__ import annotations

import os

import numpy as np

DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")

DIGITS_TEST_SIZE = 360


def digits_split(test_size: int = DIGITS_TEST_SIZE, split_seed: int = 1234, images: bool = False):
    """1,797 handwritten digits (10 classes), scaled to [0, 1], split the same way on every rank.

    images: return ``(N, 8, 8, 1)`` arrays instead of flat 64-vectors.
    """
    x, y = load_digits()
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    if images:
        x = x.reshape(-1, 8, 8, 1)
    order = np.random.default_rng(split_seed).permutation(len(x))
    test, train = order[:test_size], order[test_size:]
    return x[train], y[train], x[test], y[test]


def load_digits():
    """The 1,797 digits as ``(pixels, labels)``: uint8 arrays of shape ``(1797, 64)`` (0..16) and ``(1797,)``.

    (scikit-learn's function of this name returns a Bunch of float64 pixels and int labels; these are its values.)
    """
    with np.load(DIGITS_FILE) as f:
        return f["data"], f["target"]


def synthetic_images(n: int, shape=(28, 28, 1), classes: int = 10, seed: int = 0):
    """Random images with learnable labels (class = brightest quadrant-ish), for throughput runs."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    y = (x.reshape(n, -1)[:, :classes].argmax(axis=1)).astype(np.int64)
    return x, y
