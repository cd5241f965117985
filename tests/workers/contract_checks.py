"""Worker for tests/test_contract_parallel.py: the adapter contract, checked in one launch.

argv: BACKEND OUT_DIR, with BACKEND one of torch, keras-loop, keras-fit. One framework per
process. Each rank writes OUT_DIR/rank{r}.json with what it observed; the test asserts.
"""
import json
import os
import sys
import zlib

import numpy as np

from hvdkit import HvdkitError, TrainConfig, Trainer
from hvdkit.sharding import plan_epoch

backend_name, out_dir = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(7)
# 50 samples: not divisible by world (2) x batch (4) -> the last step is short (2 samples).
X = rng.normal(size=(50, 6)).astype(np.float32)
Y = rng.integers(0, 3, size=50).astype(np.int64)
X_EVAL = rng.normal(size=(37, 6)).astype(np.float32)
Y_EVAL = rng.integers(0, 3, size=37).astype(np.int64)
LAUNCH_RANK = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))


class TorchBackend:
    def __init__(self):
        import torch
        from torch import nn
        from hvdkit.torch import TorchAdapter
        torch.set_num_threads(1)
        self.torch, self.nn, self.Adapter = torch, nn, TorchAdapter

    def model_and_opt(self, seed):
        self.torch.manual_seed(seed)
        model = self.nn.Sequential(self.nn.Linear(6, 8), self.nn.Tanh(), self.nn.Linear(8, 3))
        return model, self.torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def adapter(self, model, opt, compression="none"):
        return self.Adapter(model, opt, self.nn.functional.cross_entropy, compression=compression)

    def flat(self, model):
        return np.concatenate([p.detach().numpy().ravel() for p in model.state_dict().values()]).astype(np.float64)

    def loss(self, model, ids, x=X, y=Y):
        return self.nn.functional.cross_entropy(model(self.torch.from_numpy(x[ids])), self.torch.from_numpy(y[ids]))

    def reference_step(self, model, opt, step):
        opt.zero_grad()
        for ids in step.micro_batches:
            (self.loss(model, ids) * len(ids) / step.samples_in_step).backward()
        opt.step()

    def evaluate(self, model):
        with self.torch.no_grad():
            out = model(self.torch.from_numpy(X_EVAL))
            return float((out.argmax(1).numpy() == Y_EVAL).mean()), float(self.loss(model, np.arange(37), X_EVAL, Y_EVAL))

    def perturb(self, model):
        with self.torch.no_grad():
            model[2].bias.add_(1.0)
        return "2.bias"


class KerasBackend:
    def __init__(self, fit):
        from hvdkit.keras import KerasAdapter, KerasFitAdapter
        import keras
        import tensorflow as tf
        self.keras, self.tf, self.fit = keras, tf, fit
        self.Adapter, self.FitAdapter = KerasAdapter, KerasFitAdapter
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def model_and_opt(self, seed):
        keras = self.keras
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(3, name="head")])
        return model, keras.optimizers.SGD(0.1, momentum=0.9)

    def adapter(self, model, opt, compression="none"):
        if self.fit:
            model.compile(optimizer=opt, loss=self.loss_fn)
            return self.FitAdapter(model, compression=compression)
        return self.Adapter(model, opt, self.loss_fn, compression=compression)

    def flat(self, model):
        return np.concatenate([v.numpy().ravel() for v in model.variables]).astype(np.float64)

    def loss(self, model, ids, x=X, y=Y):
        return self.loss_fn(y[ids], model(x[ids], training=True))

    def reference_step(self, model, opt, step):
        total = None
        for ids in step.micro_batches:
            with self.tf.GradientTape() as tape:
                loss = self.loss(model, ids) * (len(ids) / step.samples_in_step)
            grads = tape.gradient(loss, model.trainable_variables)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        opt.apply(total, model.trainable_variables)

    def evaluate(self, model):
        out = model(X_EVAL, training=False).numpy()
        return float((out.argmax(1) == Y_EVAL).mean()), float(self.loss_fn(Y_EVAL, out))

    def perturb(self, model):
        head = model.get_layer("head")
        head.bias.assign(head.bias.numpy() + 1.0)
        return head.bias.path


B = TorchBackend() if backend_name == "torch" else KerasBackend(fit=backend_name == "keras-fit")


def reference(epochs, batch, accumulation, seed=0):
    """One process, no Horovod: batch = world x per-worker batch, plain framework code, same sample order."""
    model, opt = B.model_and_opt(seed=123)
    for epoch in range(epochs):
        for step in plan_epoch(len(X), 0, 1, batch, seed, epoch, accumulation):
            B.reference_step(model, opt, step)
    return model


def fit(cfg, seed_model=None, eval_data=None, compression="none"):
    # Each rank starts from different weights: the broadcast from rank 0 must make them equal.
    model, opt = B.model_and_opt(seed=seed_model if seed_model is not None else 123 + 1000 * LAUNCH_RANK)
    adapter = B.adapter(model, opt, compression)
    result = Trainer(adapter, cfg).fit((X, Y), eval_data)
    return adapter, model, result


record = {"backend": backend_name}
quiet = dict(progress_bar=False, lr_scaling="none", seed=0)

# 1. Gradient equivalence (with the short last step), plain and with 2-step accumulation.
for name, accumulation in (("plain", 1), ("accumulation", 2)):
    adapter, model, result = fit(TrainConfig(epochs=3, batch_size=4, accumulation=accumulation, **quiet))
    ref = reference(3, 4 * result.world_size, accumulation)
    record[f"equiv_{name}_maxdiff"] = float(np.abs(B.flat(model) - B.flat(ref)).max())
    record[f"equiv_{name}_steps"] = result.global_step
    record[f"equiv_{name}_samples"] = result.train_samples_per_epoch
record["rank"], record["size"] = result.rank, result.world_size
RANK = result.rank
record["checksum"] = zlib.crc32(B.flat(model).tobytes())
# fp16 compression: gradients travel as fp16, so close to the exact result but not equal; ranks stay identical.
_, model16, _ = fit(TrainConfig(epochs=3, batch_size=4, **quiet), compression="fp16")
record["fp16_maxdiff"] = float(np.abs(B.flat(model16) - B.flat(reference(3, 4 * record["size"], 1))).max())
record["fp16_checksum"] = zlib.crc32(B.flat(model16).tobytes())

# 2. Exact evaluation: every eval sample counted once, metrics equal to a one-process evaluation.
adapter, model, result = fit(TrainConfig(epochs=1, batch_size=4, eval_batch_size=5, **quiet), eval_data=(X_EVAL, Y_EVAL))
record["eval_expected_accuracy"], record["eval_expected_loss"] = B.evaluate(model)
record["eval"] = result.eval

# 3. Checkpoint mid-epoch and resume == uninterrupted (deterministic settings).
ckpt_a, ckpt_b = os.path.join(out_dir, "ckpt_a"), os.path.join(out_dir, "ckpt_b")
_, model_a, _ = fit(TrainConfig(epochs=3, batch_size=4, checkpoint_dir=ckpt_a, **quiet))
_, _, stopped = fit(TrainConfig(epochs=3, batch_size=4, checkpoint_dir=ckpt_b, stop_after_steps=9, **quiet))
# A fresh model with other weights: everything must come from the checkpoint.
_, model_b, resumed = fit(TrainConfig(epochs=3, batch_size=4, checkpoint_dir=ckpt_b, **quiet), seed_model=999)
record["resume_stopped_early"] = stopped.stopped_early
record["resume_from"] = {k: resumed.resumed_from[k] for k in ("epoch", "position", "global_step")}
record["resume_maxdiff"] = float(np.abs(B.flat(model_a) - B.flat(model_b)).max())
record["resume_final_step"] = resumed.global_step

# 4. Corrupt newest checkpoint: reported, the previous one is used. Then all corrupt: clear error everywhere.
if RANK == 0:
    files = sorted(f for f in os.listdir(ckpt_a) if f.endswith(".bin"))
    with open(os.path.join(ckpt_a, files[-1]), "r+b") as f:
        f.truncate(100)
    record["corrupted_file"] = files[-1]
_, _, fallback = fit(TrainConfig(epochs=4, batch_size=4, checkpoint_dir=ckpt_a, **quiet))
record["fallback_resumed_from"] = fallback.resumed_from["file"]
record["fallback_epochs"] = fallback.epochs_done
if RANK == 0:
    for f in os.listdir(ckpt_a):
        if f.endswith(".bin"):
            with open(os.path.join(ckpt_a, f), "r+b") as fh:
                fh.truncate(10)
try:
    fit(TrainConfig(epochs=5, batch_size=4, checkpoint_dir=ckpt_a, **quiet))
    record["all_corrupt_error"] = None
except HvdkitError as e:
    record["all_corrupt_error"] = str(e)

# 5. A second fit of the same adapter continues the first (weights and optimizer state, e.g. momentum), with its
# own accumulation: fits of 2 epochs, then 1 with 2-step accumulation, equal one reference run of epochs 0, 1 and
# then 0 again (each fit numbers its epochs from 0). Keras' fit sets accumulation when its optimizer is built (the
# first fit): 1 there.
SECOND_ACCUMULATION = 1 if backend_name == "keras-fit" else 2
model, opt = B.model_and_opt(seed=123 + 1000 * LAUNCH_RANK)
adapter = B.adapter(model, opt)
Trainer(adapter, TrainConfig(epochs=2, batch_size=4, **quiet)).fit((X, Y))
try:
    second = Trainer(adapter, TrainConfig(epochs=1, batch_size=4, accumulation=SECOND_ACCUMULATION, **quiet)).fit((X, Y))
    ref, ref_opt = B.model_and_opt(seed=123)
    for epoch, accumulation in ((0, 1), (1, 1), (0, SECOND_ACCUMULATION)):
        for step in plan_epoch(len(X), 0, 1, 4 * second.world_size, 0, epoch, accumulation):
            B.reference_step(ref, ref_opt, step)
    record["second_fit"] = {"maxdiff": float(np.abs(B.flat(model) - B.flat(ref)).max()), "steps": second.global_step,
                            "accumulation": SECOND_ACCUMULATION}
except Exception as e:   # named in the record: the test shows it
    record["second_fit"] = {"error": f"{type(e).__name__}: {e}"}
# the same two fits, the first with the optimizer state sharded (ZeRO): the second, unsharded, goes on from its
# gathered state (torch: into Horovod's wrapper, which starts empty)
model, opt = B.model_and_opt(seed=123 + 1000 * LAUNCH_RANK)
adapter = B.adapter(model, opt)
try:
    Trainer(adapter, TrainConfig(epochs=2, batch_size=4, shard_optimizer=True, **quiet)).fit((X, Y))
    Trainer(adapter, TrainConfig(epochs=1, batch_size=4, accumulation=SECOND_ACCUMULATION, **quiet)).fit((X, Y))
    record["second_fit_after_sharded"] = {"maxdiff": float(np.abs(B.flat(model) - B.flat(ref)).max())}
except Exception as e:
    record["second_fit_after_sharded"] = {"error": f"{type(e).__name__}: {e}"}
if backend_name == "torch":   # after a fit on Horovod's optimizer (its hooks stay): a sharded fit is refused
    try:
        Trainer(adapter, TrainConfig(epochs=1, batch_size=4, shard_optimizer=True, **quiet)).fit((X, Y))
        record["sharded_after_wrapped"] = None
    except HvdkitError as e:
        record["sharded_after_wrapped"] = str(e)
    # fine-tuning: a layer frozen in the first fit, unfrozen for the second; Horovod's wrapper would not average it
    model, opt = B.model_and_opt(seed=123)
    model[0].weight.requires_grad_(False)
    adapter = B.adapter(model, opt)
    Trainer(adapter, TrainConfig(epochs=1, batch_size=4, **quiet)).fit((X, Y))
    model[0].weight.requires_grad_(True)
    try:
        Trainer(adapter, TrainConfig(epochs=1, batch_size=4, **quiet)).fit((X, Y))
        record["unfrozen_after_wrapped"] = None
    except HvdkitError as e:
        record["unfrozen_after_wrapped"] = str(e)
    # a fit that stopped between backward and the step, on every rank: Horovod's allreduces of that step were
    # launched and never synchronized (an HvdkitError leaves Horovod up, so the script may fit again): the next fit
    # on that adapter is refused. nonfinite="stop" (the default) pins the step to _checked_step
    model, opt = B.model_and_opt(seed=123)
    adapter = B.adapter(model, opt)

    def stop_before_the_step():
        raise HvdkitError("injected: stopped after the backward pass")

    adapter._checked_step = stop_before_the_step   # the guard's step: synchronize, norm, step
    try:
        Trainer(adapter, TrainConfig(epochs=1, batch_size=4, nonfinite="stop", **quiet)).fit((X, Y))
        record["stopped_mid_step"] = None
    except HvdkitError as e:
        record["stopped_mid_step"] = str(e)
    del adapter._checked_step
    try:
        Trainer(adapter, TrainConfig(epochs=1, batch_size=4, **quiet)).fit((X, Y))
        record["fit_after_stopped_mid_step"] = None
    except HvdkitError as e:
        record["fit_after_stopped_mid_step"] = str(e)

# 6. Divergence check: make rank 1 differ on purpose; the check must name the rank and the tensor.
model, opt = B.model_and_opt(seed=5)
adapter = B.adapter(model, opt)
process = adapter.default_process()
process.init(seed=0, threads=1)
adapter.attach(process)
adapter.prepare(lr_factor=1.0, accumulation=1)
trainer = Trainer(adapter, TrainConfig(**quiet), process=process)
record["perturbed"] = B.perturb(model) if RANK == 1 else None
try:
    trainer.check_same_parameters("in the test")
    record["divergence_error"] = None
except HvdkitError as e:
    record["divergence_error"] = str(e)

with open(os.path.join(out_dir, f"rank{RANK}.json"), "w") as f:
    json.dump(record, f)
