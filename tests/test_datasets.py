"""The digits data shipped in the package: the UCI test set, split the same way on every rank."""
import hashlib

import numpy as np

from hvdkit.datasets import digits_split, load_digits


def test_the_shipped_digits_are_the_uci_test_set():
    x, y = load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert x.min() == 0 and x.max() == 16
    # the class sizes of the UCI "optdigits" test set (optdigits.tes)
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # three pixels on the left and right edges are never inked in this data; the centre ones usually are
    assert np.flatnonzero(x.max(axis=0) == 0).tolist() == [0, 32, 39] and x[:, 27].mean() > 8
    # the exact bytes shipped (the same arrays, in the same order, as scikit-learn 1.9's load_digits)
    assert hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16] == "87ff0c9e40dc7e2c"


def test_the_split_is_disjoint_scaled_and_the_same_every_time():
    x_train, y_train, x_test, y_test = digits_split()
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() == 1.0
    again = digits_split()
    assert all(np.array_equal(a, b) for a, b in zip((x_train, y_train, x_test, y_test), again))
    # every image lands in exactly one part: together they are the whole data, each row once
    # every (image, label) pair lands in exactly one part: together they are the whole data, each pair once
    x, y = load_digits()
    whole = (np.concatenate([x_train, x_test]) * 16.0).astype(np.uint8)
    labels = np.concatenate([y_train, y_test])
    assert sorted(zip(map(bytes, whole), labels.tolist())) == sorted(zip(map(bytes, x), y.tolist()))
    other = digits_split(split_seed=7)
    assert not np.array_equal(other[0], x_train)
    images = digits_split(images=True)
    assert images[0].shape == (1437, 8, 8, 1) and np.array_equal(images[0].reshape(-1, 64), x_train)
