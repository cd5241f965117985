"""TrainConfig validation and LR policy; TorchData over arrays and a map-style Dataset (one process)."""
import numpy as np
import pytest

from hvdkit import HvdkitError, TrainConfig


@pytest.mark.parametrize("field, value, words", [
    ("epochs", 0, "--epochs"), ("batch_size", 0, "--batch-size"), ("accumulation", 0, "accumulation"),
    ("commit_every", 0, "commit_every"), ("lr_scaling", "sqrt", "lr_scaling"), ("threads", 0, "threads"),
])
def test_bad_config_is_one_clear_error(field, value, words):
    with pytest.raises(HvdkitError, match=words):
        TrainConfig(**{field: value}).validate()


def test_lr_policy_linear_with_warmup_and_custom():
    cfg = TrainConfig(lr_scaling="linear", warmup_steps=4)
    assert [cfg.lr_factor(4, s) for s in range(6)] == [1.75, 2.5, 3.25, 4.0, 4.0, 4.0]
    assert TrainConfig(lr_scaling="none").lr_factor(8, 100) == 1.0
    assert TrainConfig(lr_scaling=lambda w: w ** 0.5).lr_factor(4, 0) == 2.0


def test_torch_data_from_arrays_and_dataset():
    torch = pytest.importorskip("torch")
    from hvdkit.torch import TorchData

    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    arrays = TorchData.of((x, y))
    xb, yb = arrays.batch(np.array([3, 1]))
    assert len(arrays) == 10 and xb.tolist() == [[6.0, 7.0], [2.0, 3.0]] and yb.tolist() == [3, 1]

    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return torch.tensor([float(i)]), i * i

    data = TorchData.of(Squares())
    xb, yb = data.batch(np.array([2, 5]))
    assert len(data) == 7 and xb.tolist() == [[2.0], [5.0]] and yb.tolist() == [4, 25]
    with pytest.raises(HvdkitError, match="different lengths"):
        TorchData.of((x, y[:5]))
    with pytest.raises(HvdkitError, match="cannot use"):
        TorchData.of(42)
