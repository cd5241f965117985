"""bf16 mixed precision for Keras 3 models: the dtype policy, which must be set before the model is built, and
the check the adapters make that a model computes in the precision its ``TrainConfig`` asks for.

Under Keras' ``mixed_bfloat16`` policy layers compute in bfloat16 and keep float32 variables: gradients come
back float32 (the gradient of a float32 variable read through a cast), so the allreduce is float32 and needs no
loss scaling (Keras wraps the optimizer in a ``LossScaleOptimizer`` only for ``mixed_float16``).

Example::

    from hvdkit.keras import use_precision
    use_precision("bf16")          # before the model is built
    model = make_model(keras)      # Dense layers: bfloat16 compute, float32 variables
    Trainer(KerasFitAdapter(model), TrainConfig(precision="bf16")).fit(train, test)
"""
from __future__ import annotations

import keras

from ..config import PRECISIONS
from ..errors import HvdkitError

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}
_LOW = ("bfloat16", "float16")


def use_precision(precision: str) -> str:
    """Layers built from now on compute in ``precision``: sets Keras' global dtype policy (``"bf16"``:
    ``mixed_bfloat16``, ``"fp32"``: ``float32``). Call it before building the model and pass the same precision
    to ``TrainConfig``. Keep the logits layer float32 (``Dense(10, dtype="float32")``, Keras' advice): losses and
    metrics then see float32 outputs (TF's ``in_top_k`` refuses bfloat16). Returns the policy's name."""
    if precision not in PRECISIONS:
        raise HvdkitError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    return POLICIES[precision]


def check_model_precision(model: keras.Model, precision: str) -> None:
    """Refuse, in one line, a model whose layers do not compute in ``precision``, or whose trained variables are
    not float32 (Horovod's MPI and Gloo allreduce cannot reduce bfloat16; float32 master weights)."""
    if precision not in PRECISIONS:
        raise HvdkitError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    low_variable = next((v for v in model.trainable_variables if str(v.dtype) in _LOW), None)
    if low_variable is not None:
        raise HvdkitError(f"variable {low_variable.path} is {low_variable.dtype}; build the model with float32 "
                          "variables (hvdkit.keras.use_precision('bf16'): bfloat16 compute, float32 weights)")
    computes = {layer.compute_dtype for layer in model._flatten_layers(include_self=True) if layer.weights}
    if "float16" in computes:
        raise HvdkitError("the model computes in float16 (mixed_float16), which needs loss scaling hvdkit does not "
                          "support; use bf16: hvdkit.keras.use_precision('bf16') and --precision bf16")
    if precision == "bf16" and "bfloat16" not in computes:
        raise HvdkitError("precision bf16 but the model computes in float32: call hvdkit.keras.use_precision('bf16') "
                          "before building the model (Keras' mixed_bfloat16 policy)")
    if precision == "fp32" and "bfloat16" in computes:
        raise HvdkitError("the model computes in bfloat16 (mixed_bfloat16 policy) but precision is fp32: pass "
                          "--precision bf16 (TrainConfig(precision='bf16')), or build it after use_precision('fp32')")
