"""bf16 mixed precision (``TrainConfig(precision="bf16")``, ``--precision bf16``): the forward pass runs in
bfloat16, parameters and the gradients handed to the allreduce stay float32, the examples' digits models reach
the fp32 accuracy within 1 point (in process, world size 1). At 2 workers under a launcher (Horovod's allreduce
refuses bfloat16 tensors, so a bf16 gradient anywhere would fail those jobs): tests/test_loop_two_workers.py."""
import importlib.util
import os

import pytest

from hvdkit import TrainConfig, Trainer
from hvdkit.datasets import digits_split
from hvdkit.errors import HvdkitError
from proc import REPO

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
import hvdkit.keras as hk  # noqa: E402  (imports TensorFlow quietly, sizes its thread pools)
import hvdkit.torch as ht  # noqa: E402
import keras  # noqa: E402

DIGITS = digits_split()
QUIET = dict(progress_bar=False, batch_size=32, seed=0)


def example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def float32_policy_after():
    yield
    keras.mixed_precision.set_global_policy("float32")  # the global policy must not leak into other tests


# ---- config and flags ------------------------------------------------------------------------------------
def test_precision_is_validated_and_comes_from_the_flag():
    with pytest.raises(HvdkitError, match="precision must be one of fp32, bf16"):
        TrainConfig(precision="fp16").validate()
    from hvdkit.scripting import config_from_args, training_parser
    parser = training_parser("t", epochs=1, batch_size=4, lr=0.1)
    assert config_from_args(parser.parse_args([])).precision == "fp32"
    assert config_from_args(parser.parse_args(["--precision", "bf16"])).precision == "bf16"


# ---- torch -----------------------------------------------------------------------------------------------
class TorchSpy(ht.LocalProcess):
    """Records the dtypes of the gradients the optimizer would hand Horovod's allreduce (at every step)."""

    def __init__(self):
        self.grad_dtypes = set()

    def distributed_optimizer(self, optimizer, named_parameters, **kwargs):
        step = optimizer.step

        def spied_step(*args, **kw):
            self.grad_dtypes.update(p.grad.dtype for g in optimizer.param_groups for p in g["params"]
                                    if p.grad is not None)
            return step(*args, **kw)
        optimizer.step = spied_step
        return optimizer


def torch_digits(precision, epochs=20):
    torch.manual_seed(0)
    model = example("torch_digits").make_model()
    seen = set()
    model[0].register_forward_hook(lambda m, i, out: seen.add((m.training, out.dtype)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    spy = TorchSpy()
    adapter = ht.TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy)
    x_train, y_train, x_test, y_test = DIGITS
    result = Trainer(adapter, TrainConfig(epochs=epochs, precision=precision, **QUIET), process=spy).fit(
        (x_train, y_train), (x_test, y_test))
    return result, model, seen, spy.grad_dtypes


def test_torch_bf16_computes_in_bf16_keeps_fp32_weights_and_gradients_and_fp32_accuracy():
    fp32, _, seen32, grads32 = torch_digits("fp32")
    bf16, model, seen, grads = torch_digits("bf16")
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}     # training and evaluation in bf16
    assert seen32 == {(True, torch.float32), (False, torch.float32)}
    assert grads == grads32 == {torch.float32}                           # the allreduce sees float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}      # master weights
    assert abs(bf16.eval["accuracy"] - fp32.eval["accuracy"]) <= 0.01, (bf16.eval, fp32.eval)
    assert bf16.eval["accuracy"] >= 0.95


def test_torch_refuses_bf16_parameters():
    model = torch.nn.Linear(64, 10).to(torch.bfloat16)
    adapter = ht.TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy)
    x_train, y_train, _, _ = DIGITS
    with pytest.raises(HvdkitError, match="weight is bfloat16; keep the model in float32"):
        Trainer(adapter, TrainConfig(precision="bf16", **QUIET), process=ht.LocalProcess()).fit(
            (x_train[:64], y_train[:64]))


# ---- Keras -----------------------------------------------------------------------------------------------
class KerasSpy(hk.LocalProcess):
    """Records (when the step is traced) the dtypes of the gradients handed to the allreduce, and counts calls."""

    def __init__(self):
        self.grad_dtypes = set()
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)

    def allreduce_gradients(self, grads, compression="none"):
        self.grad_dtypes.update(g.dtype.name for g in grads)
        self.calls.assign_add(1)
        return super().allreduce_gradients(grads, compression)


def keras_digits(precision, mode, epochs=10):
    hk.use_precision(precision)
    keras.utils.set_random_seed(0)
    model = example("keras_digits").make_model(keras)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    adapter = hk.make_adapter(model, keras.optimizers.SGD(0.05, momentum=0.9), loss, mode=mode)
    spy = KerasSpy()
    x_train, y_train, x_test, y_test = DIGITS
    result = Trainer(adapter, TrainConfig(epochs=epochs, precision=precision, **QUIET), process=spy).fit(
        (x_train, y_train), (x_test, y_test))
    return result, model, spy


@pytest.mark.parametrize("mode", ["fit", "loop"])
def test_keras_bf16_computes_in_bf16_keeps_fp32_weights_and_gradients_and_fp32_accuracy(mode):
    fp32, _, spy32 = keras_digits("fp32", mode)
    bf16, model, spy = keras_digits("bf16", mode)
    assert model.dtype_policy.name == "mixed_bfloat16"
    # hidden layers in bf16; the example keeps its logits layer float32 (Keras' advice: losses, metrics)
    assert [layer.compute_dtype for layer in model.layers] == ["bfloat16", "bfloat16", "float32"]
    assert model.layers[0](DIGITS[2][:4], training=False).dtype == "bfloat16"
    assert {v.dtype for v in model.trainable_variables} == {"float32"}  # master weights
    assert spy.grad_dtypes == spy32.grad_dtypes == {"float32"}          # the allreduce sees float32
    assert int(spy.calls.numpy()) == bf16.global_step                   # once per step: averaging happens
    if mode == "fit":  # bf16 needs no loss scaling: Keras wraps only mixed_float16 in a LossScaleOptimizer
        assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert abs(bf16.eval["accuracy"] - fp32.eval["accuracy"]) <= 0.01, (bf16.eval, fp32.eval)
    assert bf16.eval["accuracy"] >= 0.95


def small_keras(precision):
    hk.use_precision(precision)
    model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(10)])
    return hk.KerasAdapter(model, keras.optimizers.SGD(0.1),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True))


@pytest.mark.parametrize("built, config, message", [
    ("fp32", "bf16", "precision bf16 but the model computes in float32: call hvdkit.keras.use_precision"),
    ("bf16", "fp32", "the model computes in bfloat16 .* but precision is fp32"),
])
def test_keras_refuses_a_model_built_for_the_other_precision(built, config, message):
    adapter = small_keras(built)
    x_train, y_train, _, _ = DIGITS
    with pytest.raises(HvdkitError, match=message):
        Trainer(adapter, TrainConfig(precision=config, **QUIET), process=hk.LocalProcess()).fit(
            (x_train[:64], y_train[:64]))


def test_keras_horovod_allreduce_of_a_bf16_gradient_runs_in_fp32():
    """Horovod's TF ops cannot reduce bfloat16: HorovodProcess casts such a gradient to float32 and back."""
    seen = []

    class FakeHvd:
        Average = "average"

        class Compression:
            fp16 = none = None

        @staticmethod
        def grouped_allreduce(tensors, **kwargs):
            seen.extend(t.dtype for t in tensors)
            return [t * 2 for t in tensors]

    process = hk.HorovodProcess()
    process.hvd = FakeHvd
    out = process.allreduce_gradients([tf.constant([1.5], tf.bfloat16), tf.constant([2.0], tf.float32)])
    assert seen == [tf.float32, tf.float32]
    assert [t.dtype for t in out] == [tf.bfloat16, tf.float32] and float(out[0][0]) == 3.0
