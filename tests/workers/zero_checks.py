"""Sharded optimizer (ZeRO stage 2) checks: models and runs shared by tests/test_zero_torch.py,
tests/test_zero_keras.py and their launches.

As a module: torch's :func:`model` (an Embedding larger than a shard, LayerNorm, optional BatchNorm, an odd
parameter count, two param groups), :func:`optimizer_for`, :func:`data`, :func:`fit` and :func:`flat`; Keras' the
same with a ``keras_`` prefix (one param group: a Keras optimizer has one set of hyperparameters).

As a script (argv: OUT_DIR CHECKPOINT_DIR [RESUME_DIR]), under horovodrun at N workers: every rank writes
OUT_DIR/rank{r}.json with
- ``equal``: for Adam and SGD+momentum, the largest parameter difference between a sharded and an unsharded run
  from the same seeds (the SGD one with clipping, accumulation 2 and a step LR schedule), and the per-rank
  optimizer state bytes of both;
- ``fp16``: the Adam run of ``equal`` with gradients compressed to fp16 on the wire, sharded and unsharded: their
  largest parameter difference, and each one's from its float32 run (:func:`compression_record`);
- ``checkpoint``: a sharded Adam run on the global batch of :data:`GLOBAL_BATCH` samples (any world size trains
  the same steps) written to CHECKPOINT_DIR after :data:`STOP_AT` steps; with RESUME_DIR, that run resumed from
  RESUME_DIR (written at another world size) to the end instead; its final parameters.

As a script with ``keras`` first (argv: keras OUT_DIR CHECKPOINT_DIR [RESUME_DIR]): the same for Keras
(:data:`KERAS_EQUAL_RUNS`, loop and fit adapters; ``fp16`` on the loop's Adam run); without RESUME_DIR a NaN loss on
rank 1 (``nonfinite``), and the checkpoint run writes CHECKPOINT_DIR and is then ``resumed`` at the same world size
from a copy of it; with RESUME_DIR it is only ``resumed`` from there, to the end.
"""
import importlib
import json
import os
import shutil
import sys

import numpy as np
import torch

from hvdkit import TrainConfig, Trainer
from hvdkit.callbacks import Callback
from hvdkit.torch import TorchAdapter

N = 96                  # samples: every step below is full at 1, 2 and 3 workers (no short last step)
GLOBAL_BATCH = 12       # samples per optimizer step at every world size (1, 2, 3 workers: batch 12, 6, 4)
STOP_AT = 5             # the checkpoint run stops (and writes) here, in its first epoch
QUIET = dict(progress_bar=False, seed=3, epochs=2, check_divergence=True)
# fp16 gradients on the wire, sharded against unsharded (the Adam run of EQUAL_RUNS / KERAS_EQUAL_RUNS), by world
# size. At 2 workers each element's sum is one a+b, which fp16 rounds alike in either order and the average halves
# exactly, so the two paths agree as in float32 (measured 0.0 in both frameworks). At 3 workers Horovod's
# allreduce and its reducescatter round a sum of three fp16 values (its order, its scaling by 1/3) differently: an
# fp16 rounding (2^-11 relative) of some gradients apart; measured 5.9e-5 (torch), 7.6e-5 (Keras) after 8 steps.
# Compression applied is proven apart from these: an fp16 run differs from its float32 run (the same code path, 0.0
# apart if the compression were dropped) by more than the float32 tolerance 1e-5.
FP16_TOLERANCE = {2: 1e-5, 3: 1.5e-4}
# 4 samples per backward pass at least: BatchNorm over 2 samples outputs only their signs, so the gradients
# before it are rounding noise (which Adam turns into full steps, differently in any two implementations)
EQUAL_RUNS = {"adam": dict(batch_size=4, scheduler=True),
              "sgd": dict(batch_size=4, accumulation=2, clip_grad_norm=0.3)}


def steps(size: int, batch_size: int, accumulation: int = 1, **_) -> int:
    """Optimizer steps of a run of QUIET's epochs at ``size`` workers."""
    return QUIET["epochs"] * N // (size * batch_size * accumulation)


class Tiny(torch.nn.Module):
    """An Embedding of 85 elements (larger than a shard at 2 and 3 workers; one row never used), LayerNorm,
    optional BatchNorm; 153 parameters with BatchNorm, 143 without (both odd).

    No gradient here is zero by symmetry (a Linear bias before BatchNorm; ReLU units all dead but one before
    LayerNorm, whose output is then constant): such a gradient is rounding noise, which Adam turns into full
    steps in a direction that differs between any two summation orders (world sizes, micro-batch splits)."""

    def __init__(self, batchnorm: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(17, 5)
        self.fc1 = torch.nn.Linear(6, 5, bias=False)
        self.norm = torch.nn.LayerNorm(5)
        self.bn = torch.nn.BatchNorm1d(5) if batchnorm else torch.nn.Identity()
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        bits = (x[:, :4] > 0).long()
        index = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2] + 8 * bits[:, 3]
        return self.fc2(self.norm(torch.tanh(self.bn(self.fc1(x) + self.embed(index)))))


def model(seed: int = 0, batchnorm: bool = True) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(batchnorm)


def optimizer_for(name: str, net: Tiny, lr: float = 0.02) -> torch.optim.Optimizer:
    """Two param groups (the head with its own LR): "adam", "adamw" (weight decay), "sgd" (momentum, Nesterov)."""
    head = list(net.fc2.parameters())
    body = [p for p in net.parameters() if all(p is not h for h in head)]
    groups = [{"params": body}, {"params": head, "lr": lr / 2}]
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.05)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr * 5, momentum=0.9, nesterov=True, weight_decay=1e-3)
    raise ValueError(name)


def data(n: int = N):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] + x[:, 4] > 0).astype(np.int64) + (x[:, 5] > 1).astype(np.int64)


def flat(net: torch.nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in net.parameters()])


def fit(name: str, shard: bool, process=None, batchnorm: bool = True, scheduler: bool = False,
        compression: str = "none", **config):
    """One run from fixed seeds: (model, adapter, FitResult)."""
    net = model(batchnorm=batchnorm)
    optimizer = optimizer_for(name, net)
    steplr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7) if scheduler else None
    adapter = TorchAdapter(net, optimizer, torch.nn.functional.cross_entropy, scheduler=steplr,
                           compression=compression)
    cfg = TrainConfig(**dict(QUIET, **config), shard_optimizer=shard)
    result = Trainer(adapter, cfg, process=process).fit(data())
    return net, adapter, result


def checkpoint_run(size: int, checkpoint_dir: str, process=None, stop: bool = True):
    """The sharded Adam run on GLOBAL_BATCH samples per step (no BatchNorm: per-rank batch statistics would
    depend on the world size), stopping after STOP_AT steps or (``stop=False``) running or resuming to the end."""
    return fit("adam", True, process=process, batchnorm=False, lr_scaling="none", batch_size=GLOBAL_BATCH // size,
               checkpoint_dir=checkpoint_dir, stop_after_steps=STOP_AT if stop else None)


class GatherWatch(Callback):
    """After each epoch's commit (its best checkpoint written): whether the sharded optimizer holds a gathered
    (unsharded) copy of its state for the current step."""
    all_ranks = True

    def __init__(self):
        self.gathered = []

    def on_epoch_end(self, trainer, epoch, metrics):
        zero = trainer.adapter._sharded
        self.gathered.append(zero._gathered is not None and zero._gathered[0] == zero.version)


def best_run(directory: str) -> dict:
    """A sharded Adam run keeping its 2 best checkpoints (by the training loss) in ``directory``/best, 3 epochs:
    whether any epoch gathered the state, and each kept checkpoint's shard files."""
    net = model(batchnorm=False)
    adapter = TorchAdapter(net, optimizer_for("adam", net), torch.nn.functional.cross_entropy)
    watch = GatherWatch()
    cfg = TrainConfig(**dict(QUIET, epochs=3), batch_size=4, shard_optimizer=True, checkpoint_dir=directory,
                      keep_best=2, monitor="loss")
    result = Trainer(adapter, cfg, [watch]).fit(data())
    best = os.path.join(directory, "best")
    return {"gathered": watch.gathered, "best_epoch": result.best["epoch"] if result.best else None,
            "files": sorted(os.listdir(best)), "state_bytes": adapter.optimizer_state_bytes()}


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def compression_record(run_fp16, fp32) -> dict:
    """fp16 gradients on the wire against float32 ones: ``run_fp16(shard)`` trains the configuration of ``fp32``
    ({shard: the flat parameters of its float32 run}) with compression="fp16" and returns its flat parameters. The
    largest parameter difference of the sharded fp16 run from the unsharded fp16 run, and of each from float32."""
    fp16 = {shard: run_fp16(shard) for shard in (False, True)}
    return {"sharded_vs_unsharded": max_diff(fp16[True], fp16[False]),
            "sharded_vs_fp32": max_diff(fp16[True], fp32[True]),
            "unsharded_vs_fp32": max_diff(fp16[False], fp32[False])}


def main(out_dir: str, checkpoint_dir: str, resume_dir: str = None) -> None:
    record = {"equal": {}}
    size = rank = None
    finals = {}   # (name, shard): flat parameters
    for name, extra in EQUAL_RUNS.items():
        plain_net, plain, _ = fit(name, False, **extra)
        sharded_net, sharded, result = fit(name, True, **extra)
        size, rank = sharded.process.size, sharded.process.rank
        finals[name, False], finals[name, True] = flat(plain_net), flat(sharded_net)
        record["equal"][name] = {
            "max_diff": max_diff(finals[name, False], finals[name, True]),
            "unsharded_bytes": plain.optimizer_state_bytes(), "sharded_bytes": sharded.optimizer_state_bytes(),
            "result_bytes": result.optimizer_state_bytes, "steps": result.global_step,
            "params": int(sum(p.numel() for p in sharded_net.parameters()))}
    record["fp16"] = compression_record(
        lambda shard: flat(fit("adam", shard, compression="fp16", **EQUAL_RUNS["adam"])[0]),
        {shard: finals["adam", shard] for shard in (False, True)})
    if resume_dir is None:
        record["best"] = best_run(checkpoint_dir.rstrip("/") + "_best")
        net, _, result = checkpoint_run(size, checkpoint_dir)
    else:
        net, _, result = checkpoint_run(size, resume_dir, stop=False)
        record["resumed_from_world"] = result.resumed_from["saved_world_size"] if result.resumed_from else None
    record["checkpoint"] = {"params": flat(net).tolist(), "steps": result.global_step}
    record.update(rank=rank, size=size)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


# ---- Keras -----------------------------------------------------------------------------------------------
# Runs compared at N workers: the loop with Adam and an LR schedule, the loop with SGD+momentum under accumulation
# and clipping, fit with AdamW (weight decay) under accumulation, clipping and a schedule
KERAS_EQUAL_RUNS = {"loop_adam": dict(mode="loop", name="adam", batch_size=4, schedule=True),
                    "loop_sgd": dict(mode="loop", name="sgd", batch_size=4, accumulation=2, clip_grad_norm=0.3),
                    "fit_adamw": dict(mode="fit", name="adamw", batch_size=4, accumulation=2, clip_grad_norm=0.3,
                                      schedule=True)}


def keras_model(seed: int = 0, batchnorm: bool = True):
    """Keras' :class:`Tiny`: an Embedding of 85 elements (larger than a shard at 2 and 3 workers; one row never
    used) indexed by the signs of 4 inputs, LayerNormalization, optional BatchNormalization; 153 trainable parameters
    with BatchNormalization, 143 without (both odd)."""
    import keras
    keras.utils.set_random_seed(seed)
    x = keras.Input(shape=(6,))
    bits = keras.ops.cast(x[:, :4] > 0, "int32")
    index = keras.ops.sum(bits * keras.ops.convert_to_tensor(np.array([1, 2, 4, 8], np.int32)), axis=1)
    h = keras.layers.Dense(5, use_bias=False)(x) + keras.layers.Embedding(17, 5)(index)
    if batchnorm:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.LayerNormalization()(keras.layers.Activation("tanh")(h))
    return keras.Model(x, keras.layers.Dense(3)(h))


def keras_optimizer_for(name: str, lr: float = 0.02, schedule: bool = False):
    """"adam", "adamw" (weight decay), "sgd" (momentum, Nesterov, weight decay); with ``schedule`` the LR decays by
    0.7 every 2 steps."""
    import keras
    lr = lr * 5 if name == "sgd" else lr
    rate = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=2, decay_rate=0.7, staircase=True) \
        if schedule else lr
    if name == "adam":
        return keras.optimizers.Adam(rate)
    if name == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=0.05)
    if name == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, weight_decay=1e-3)
    raise ValueError(name)


def keras_loss():
    import keras
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def keras_adapter(mode: str, model, optimizer, loss=None, compression: str = "none"):
    from hvdkit.keras import KerasAdapter, KerasFitAdapter
    loss = loss or keras_loss()
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=loss)
        return KerasFitAdapter(model, compression=compression)
    return KerasAdapter(model, optimizer, loss, compression=compression)


class KerasNanInStep(Callback):
    """A Keras loss (``loss(y_true, y_pred)``) that is NaN in global step ``bad`` (1-based) only, on rank ``rank``
    alone (None: every rank); as a trainer callback it is told the step (a variable the traced step reads)."""
    all_ranks = True

    def __init__(self, bad: int, rank: int = None):
        import tensorflow as tf
        self.bad, self.rank, self.flag = bad, rank, tf.Variable(0.0, trainable=False)

    def __call__(self, y_true, y_pred):
        import tensorflow as tf
        return keras_loss()(y_true, y_pred) + tf.where(self.flag > 0, np.float32(np.nan), np.float32(0))

    def on_train_begin(self, trainer):
        self._set(trainer, 0)

    def on_step_end(self, trainer, global_step, loss):
        self._set(trainer, global_step)

    def _set(self, trainer, done: int) -> None:
        here = self.rank is None or trainer.process.rank == self.rank
        self.flag.assign(1.0 if here and done + 1 == self.bad else 0.0)


def keras_flat(model) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


def keras_fit(name: str, shard: bool, mode: str = "loop", process=None, batchnorm: bool = True,
              schedule: bool = False, callbacks=(), loss=None, compression: str = "none", **config):
    """One Keras run from fixed seeds: (model, adapter, FitResult)."""
    model = keras_model(batchnorm=batchnorm)
    adapter = keras_adapter(mode, model, keras_optimizer_for(name, schedule=schedule), loss=loss,
                            compression=compression)
    cfg = TrainConfig(**dict(QUIET, **config), shard_optimizer=shard)
    result = Trainer(adapter, cfg, list(callbacks), process=process).fit(data())
    return model, adapter, result


def keras_checkpoint_run(size: int, checkpoint_dir: str, shard: bool = True, process=None, stop: bool = True):
    """The Keras checkpoint scenario (see :func:`checkpoint_run`), in the loop adapter."""
    return keras_fit("adam", shard, process=process, batchnorm=False, lr_scaling="none",
                     batch_size=GLOBAL_BATCH // size, checkpoint_dir=checkpoint_dir,
                     stop_after_steps=STOP_AT if stop else None)


def keras_equal(record: dict) -> dict:
    """``record["equal"]`` for every run of KERAS_EQUAL_RUNS; returns {(key, shard): flat parameters}."""
    finals = {}
    for key, run in KERAS_EQUAL_RUNS.items():
        extra = {k: v for k, v in run.items() if k != "name"}
        plain_model, plain, _ = keras_fit(run["name"], False, **extra)
        sharded_model, sharded, result = keras_fit(run["name"], True, **extra)
        finals[key, False], finals[key, True] = keras_flat(plain_model), keras_flat(sharded_model)
        record["equal"][key] = {
            "max_diff": max_diff(finals[key, False], finals[key, True]),
            "unsharded_bytes": plain.optimizer_state_bytes(), "sharded_bytes": sharded.optimizer_state_bytes(),
            "result_bytes": result.optimizer_state_bytes, "steps": result.global_step,
            "iterations": int(sharded.optimizer.iterations.numpy()),
            "user_optimizer_variables": len(sharded.optimizer.variables),
            "params": int(keras_flat(sharded_model).size)}
        record.update(rank=result.rank, size=result.world_size)
    return finals


def keras_nonfinite() -> dict:
    """A NaN loss on rank 1 alone in step 3, skipped on every rank, sharded and not."""
    finals, skipped = [], []
    for shard in (False, True):
        nan_in_step = KerasNanInStep(3, rank=1)
        model, _, result = keras_fit("adam", shard, batch_size=4, nonfinite="skip", loss=nan_in_step,
                                     callbacks=[nan_in_step])
        finals.append(keras_flat(model))
        skipped.append(result.skipped_steps)
    return {"skipped": skipped, "max_diff": max_diff(finals[0], finals[1]),
            "finite": bool(np.isfinite(finals[1]).all())}


def keras_resumed(size: int, resume_dir: str) -> dict:
    model, _, result = keras_checkpoint_run(size, resume_dir, stop=False)
    return {"params": keras_flat(model).tolist(), "steps": result.global_step,
            "from_step": result.resumed_from["global_step"] if result.resumed_from else None,
            "from_world": result.resumed_from["saved_world_size"] if result.resumed_from else None}


def keras_main(out_dir: str, checkpoint_dir: str, resume_dir: str = None) -> None:
    """Without ``resume_dir``: the checkpoint run writes ``checkpoint_dir`` and is resumed at this world size from a
    copy of it. With it: only resumed from ``resume_dir`` (written at another world size), and no NaN run."""
    record = {"equal": {}}
    finals = keras_equal(record)
    run = {k: v for k, v in KERAS_EQUAL_RUNS["loop_adam"].items() if k != "name"}
    record["fp16"] = compression_record(
        lambda shard: keras_flat(keras_fit("adam", shard, compression="fp16", **run)[0]),
        {shard: finals["loop_adam", shard] for shard in (False, True)})
    if resume_dir is None:
        record["nonfinite"] = keras_nonfinite()
        model, _, result = keras_checkpoint_run(record["size"], checkpoint_dir)
        record["checkpoint"] = {"params": keras_flat(model).tolist(), "steps": result.global_step}
        # resumed here, at this world size, from a copy (rank 0 reads checkpoints; the others get its state broadcast)
        resume_dir = checkpoint_dir.rstrip("/") + "_resumed"
        if record["rank"] == 0:
            shutil.copytree(checkpoint_dir, resume_dir, dirs_exist_ok=True)
    record["resumed"] = keras_resumed(record["size"], resume_dir)
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["keras"]:
        importlib.import_module("hvdkit.keras")   # TensorFlow's threads and logs set up before its first op
        keras_main(*sys.argv[2:])
    else:
        torch.set_num_threads(1)
        main(*sys.argv[1:])


def two_shard_manifest(checkpoints) -> dict:
    """The index of the first checkpoint written by 2 sharded workers (a pathlib.Path directory), after checking
    that it lists a shard per rank and that each rank's shard holds exactly half of every flat state vector."""
    import json
    manifest = json.loads((checkpoints / "ckpt-00000000.json").read_text())
    assert [s["rank"] for s in manifest["shards"]] == [0, 1] and manifest["shard_index"]["world"] == 2
    for name, padded in manifest["shard_index"]["flats"].items():   # each rank wrote its half, nothing more
        assert [len(np.load(checkpoints / s["file"])[name]) for s in manifest["shards"]] == [padded // 2] * 2
    return manifest

