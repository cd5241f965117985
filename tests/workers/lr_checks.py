"""LR and clipping probe, and the 2-worker worker of tests/test_lr_and_clipping.py.

As a module: :class:`LrProbe`, a trainer callback that records, on every rank and after every step, the LR the
optimizer step actually applied, read from the framework (torch: each param group's ``lr`` seen by a step
pre-hook on the optimizer, Horovod's wrapper included; Keras: the ``learning_rate`` passed to the optimizer's
update step inside the traced step). :func:`install` adds it to every Trainer of a script run in this process
(for tests/workers/gated.py: ``HVDKIT_LR_LOG=DIR``), :func:`read_log` reads the records back and
:func:`mismatches` checks them against ``lr(step) = schedule(step) x factor(world size, step)``.

As a wrapper (argv: run LOG_DIR SCRIPT [ARGS...]): runs SCRIPT with :func:`install` (LOG_DIR).

As a script (argv: BACKEND OUT_DIR; BACKEND torch or keras): every rank writes OUT_DIR/rank{r}.json with the LR
records of schedules under linear scaling and warmup (torch: per step and per epoch; Keras: both adapters), and the
final parameters of runs with gradient clipping; the test compares them with the formula and with one process
trained on the whole batch. Keras also: a non-finite loss on rank 1 alone, stopped (loop) and skipped (fit).
"""
import glob
import json
import os
import sys
from typing import Callable, Dict, List, Optional

from hvdkit.callbacks import Callback


def _torch_reader(optimizer):
    last = {"lr": None}

    def hook(opt, args, kwargs):
        last["lr"] = [float(group["lr"]) for group in opt.param_groups]
    optimizer.register_step_pre_hook(hook)
    return lambda: last["lr"]


def _keras_reader(optimizer):
    import tensorflow as tf
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    seen = tf.Variable(float("nan"), trainable=False, dtype=tf.float64)
    update = inner._backend_update_step

    def spy(grads, trainable_variables, learning_rate):
        seen.assign(tf.cast(learning_rate, tf.float64))
        return update(grads, trainable_variables, learning_rate)
    inner._backend_update_step = spy
    return lambda: [float(seen.numpy())]


class LrProbe(Callback):
    """Records ``{"step", "rank", "size", "lr": [per param group]}`` after every step, on every rank; appends
    each record as a JSON line to ``path`` when given. Installed in ``on_train_begin`` (the optimizer is wrapped
    by then, the step not yet traced)."""

    all_ranks = True

    def __init__(self, path: Optional[str] = None):
        self.path, self.records, self._read = path, [], None

    def on_train_begin(self, trainer):
        if self._read is None:
            adapter = trainer.adapter
            self._read = (_torch_reader if adapter.framework == "torch" else _keras_reader)(adapter.optimizer)

    def on_step_end(self, trainer, global_step, loss):
        record = {"step": int(global_step), "rank": trainer.process.rank, "size": trainer.process.size,
                  "lr": self._read()}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def install(directory: str) -> None:
    """Every Trainer made in this process from now on records its LRs to ``directory/lr-<pid>.jsonl``."""
    from hvdkit.trainer import Trainer
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"lr-{os.getpid()}.jsonl")
    original = Trainer.__init__

    def __init__(self, adapter, config=None, callbacks=(), *args, **kw):
        original(self, adapter, config, list(callbacks) + [LrProbe(path)], *args, **kw)
    Trainer.__init__ = __init__


def read_log(directory: str) -> List[Dict]:
    """Every record :func:`install` wrote under ``directory``, from every process."""
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "lr-*.jsonl"))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def world_factor(size: int, step: int, scaling="linear", warmup: int = 0) -> float:
    """The documented factor, written out here rather than taken from TrainConfig: the scaled target
    (``size`` for linear, 1 for none, or ``scaling(size)``), ramped from 1 over ``warmup`` steps."""
    target = float(scaling(size)) if callable(scaling) else float(size) if scaling == "linear" else 1.0
    if warmup and step < warmup:
        return 1.0 + (target - 1.0) * (step + 1) / warmup
    return target


def mismatches(records: List[Dict], schedule: Callable[[int], List[float]], scaling="linear", warmup: int = 0,
               rel: float = 1e-6, atol: float = 1e-8) -> List[Dict]:
    """Records whose LR is not ``schedule(t) x world_factor(size, t)``, t = the step's 0-based index
    (``record["step"] - 1``); ``schedule(t)`` gives one LR per param group. Keras computes the LR in float32:
    ``atol`` covers it near 0 (the end of a cosine)."""
    bad = []
    for r in records:
        t = r["step"] - 1
        expected = [lr * world_factor(r["size"], t, scaling, warmup) for lr in schedule(t)]
        if len(expected) != len(r["lr"]) or any(abs(a - b) > rel * abs(b) + atol
                                                for a, b in zip(r["lr"], expected)):
            bad.append(dict(r, expected=expected))
    return bad


# ---- the 2-worker worker ---------------------------------------------------------------------------------
N, BATCH, EPOCHS = 52, 4, 2     # 2 workers x 4: 7 steps per epoch, the last one short (4 samples)
BASE_LRS = (0.1, 0.02)          # two param groups
CLIP = 0.05                     # well below the gradients' norm (about 0.5 here)


def data():
    import numpy as np
    rng = np.random.default_rng(17)
    return rng.normal(size=(N, 6)).astype(np.float32), rng.integers(0, 3, size=N).astype(np.int64)


def torch_model_and_optimizer(seed: int, momentum: float = 0.9):
    import torch
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    groups = [{"params": model[0].parameters(), "lr": BASE_LRS[0]}, {"params": model[2].parameters(), "lr": BASE_LRS[1]}]
    return model, torch.optim.SGD(groups, lr=BASE_LRS[0], momentum=momentum)


def eval_data():
    """An odd evaluation set: 23 samples, so 2 ranks get unequal shares."""
    import numpy as np
    rng = np.random.default_rng(23)
    return rng.normal(size=(23, 6)).astype(np.float32), rng.integers(0, 3, size=23).astype(np.int64)


def token_data():
    """N sequences of 5 token ids (vocabulary 20) and labels 0..2."""
    import numpy as np
    rng = np.random.default_rng(29)
    return rng.integers(0, 20, size=(N, 5)).astype(np.int64), rng.integers(0, 3, size=N).astype(np.int64)


def numpy_scores(logits, labels):
    """accuracy, top-2 accuracy and mean cross entropy over the whole set, in numpy."""
    import numpy as np
    ranked = np.argsort(-logits, axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {"accuracy": float(np.mean(ranked[:, 0] == labels)),
            "top2": float(np.mean((ranked[:, :2] == labels[:, None]).any(axis=1))),
            "loss": float(-log_probs[np.arange(len(labels)), labels].mean()), "samples": len(labels)}


def keras_model_and_optimizer(seed: int, schedule: bool, momentum: float = 0.9):
    """Dense(8, tanh) -> Dense(3), SGD at 0.1 or ExponentialDecay(0.1, 3 steps, x0.5, staircase)."""
    import keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    lr = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5, staircase=True) \
        if schedule else 0.1
    return model, keras.optimizers.SGD(lr, momentum=momentum)


def inf_when_label_is_99(y_true, y_pred):
    """Cross entropy plus +inf for a batch holding label 99: an Inf loss on the rank that has that sample only."""
    import tensorflow as tf
    y_true = tf.cast(y_true, tf.int32)
    clean = tf.where(tf.equal(y_true, 99), tf.zeros_like(y_true), y_true)
    flag = tf.reduce_any(tf.equal(y_true, 99))
    cross_entropy = tf.keras.losses.sparse_categorical_crossentropy(clean, y_pred, from_logits=True)
    return tf.reduce_mean(cross_entropy) + tf.stop_gradient(tf.where(flag, float("inf"), 0.0))


BAD_STEP = 3   # the Keras non-finite runs: rank 1 alone has an Inf loss in global step 3 (epoch 1)


def keras_main(out_dir: str, launch_rank: int) -> None:
    import numpy as np
    from hvdkit import TrainConfig, Trainer
    from hvdkit.errors import StoppedOnEveryRank
    from hvdkit.keras import make_adapter
    from hvdkit.sharding import plan_epoch
    import keras
    x, y = data()
    quiet = dict(progress_bar=False, batch_size=BATCH, epochs=EPOCHS, seed=0)
    record = {"backend": "keras"}

    def adapter_for(mode, model, optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)):
        return make_adapter(model, optimizer, loss, mode=mode)

    # LR each step: the schedule x linear scaling ramped over 5 steps, both adapters
    for mode in ("loop", "fit"):
        model, optimizer = keras_model_and_optimizer(3 + launch_rank, schedule=True)  # rank 0's are broadcast
        probe = LrProbe()
        result = Trainer(adapter_for(mode, model, optimizer), TrainConfig(lr_scaling="linear", warmup_steps=5, **quiet),
                         [probe]).fit((x, y))
        record[f"lr_{mode}"] = probe.records
        record["size"], record["rank"], record["steps"] = result.world_size, result.rank, result.global_step

    # Clipping of the averaged gradients: the loop step, and fit with 2 backward passes per step
    for mode, accumulation in (("loop", 1), ("fit", 2)):
        model, optimizer = keras_model_and_optimizer(3 + launch_rank, schedule=False)
        Trainer(adapter_for(mode, model, optimizer),
                TrainConfig(lr_scaling="none", clip_grad_norm=CLIP, accumulation=accumulation, **quiet)).fit((x, y))
        record[f"clip_{mode}_acc{accumulation}"] = [v.numpy().astype(np.float64).ravel().tolist()
                                                    for v in model.trainable_variables]

    # Metrics over an odd evaluation set, fit mode with compiled metrics, against numpy with the final model
    x_eval, y_eval = eval_data()
    model, optimizer = keras_model_and_optimizer(3 + launch_rank, schedule=False)
    adapter = make_adapter(model, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), mode="fit",
                           metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")])
    result = Trainer(adapter, TrainConfig(lr_scaling="none", **dict(quiet, epochs=1))).fit((x, y), (x_eval, y_eval))
    record["metrics_odd"] = {"reported": result.eval,
                             "expected": numpy_scores(np.asarray(model(x_eval), dtype=np.float64), y_eval)}

    # Non-finite: label 99 in a sample rank 1 trains in step BAD_STEP; rank 0's own losses stay finite
    bad_y = y.copy()
    bad_y[plan_epoch(N, 1, 2, BATCH, 0, 0, 1)[BAD_STEP - 1].micro_batches[0][0]] = 99
    for mode, nonfinite in (("loop", "stop"), ("fit", "skip")):
        model, optimizer = keras_model_and_optimizer(3, schedule=False)
        trainer = Trainer(adapter_for(mode, model, optimizer, loss=inf_when_label_is_99),
                          TrainConfig(lr_scaling="none", nonfinite=nonfinite, **dict(quiet, epochs=1)))
        try:
            result = trainer.fit((x, bad_y))
            record[f"nonfinite_{mode}"] = {"skipped": result.skipped_steps, "steps": result.global_step,
                                           "loss": result.history[-1]["loss"],
                                           "params": [v.numpy().astype(np.float64).ravel().tolist()
                                                      for v in model.trainable_variables]}
        except StoppedOnEveryRank as e:
            record[f"nonfinite_{mode}"] = {"stopped": str(e)}
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


def main(backend: str, out_dir: str) -> None:
    import numpy as np
    launch_rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
    if backend == "keras":
        return keras_main(out_dir, launch_rank)
    if backend != "torch":
        sys.exit(f"unknown backend {backend!r}")
    import torch
    from hvdkit import TrainConfig, Trainer
    from hvdkit.errors import StoppedOnEveryRank
    from hvdkit.sharding import plan_epoch
    from hvdkit.torch import TorchAdapter

    def torch_top2_hits(outputs, targets):
        return (outputs.topk(2, dim=1).indices == targets[:, None]).any(dim=1).sum()

    def torch_inf_when_label_is_99(outputs, targets):
        clean = torch.where(targets == 99, torch.zeros_like(targets), targets)
        return torch.nn.functional.cross_entropy(outputs, clean) + (float("inf") if bool((targets == 99).any()) else 0.0)

    class SparseBag(torch.nn.Module):
        """A sparse-gradient embedding (the first parameter the optimizer steps), mean-pooled, then linear."""
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(20, 4, sparse=True)
            self.out = torch.nn.Linear(4, 3)

        def forward(self, tokens):
            return self.out(self.embedding(tokens).mean(dim=1))
    x, y = data()
    quiet = dict(progress_bar=False, batch_size=BATCH, epochs=EPOCHS, seed=0)
    record = {"backend": backend}

    # LR each step: a per-step and a per-epoch StepLR, linear scaling (x2 at 2 workers) ramped over 5 steps
    for interval, step_size in (("step", 3), ("epoch", 1)):
        model, optimizer = torch_model_and_optimizer(seed=5 + launch_rank)   # rank 0's weights are broadcast
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.5)
        probe = LrProbe()
        adapter = TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy, scheduler=scheduler,
                               scheduler_interval=interval)
        result = Trainer(adapter, TrainConfig(lr_scaling="linear", warmup_steps=5, **quiet), [probe]).fit((x, y))
        record[f"lr_{interval}"] = probe.records
        record[f"lr_{interval}_between_steps"] = [float(g["lr"]) for g in adapter.optimizer.param_groups]
        record["size"], record["rank"], record["steps"] = result.world_size, result.rank, result.global_step

    # Clipping of the averaged gradients, plain and with 2 backward passes per step
    for accumulation in (1, 2):
        model, optimizer = torch_model_and_optimizer(seed=9 + launch_rank)
        adapter = TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy)
        Trainer(adapter, TrainConfig(lr_scaling="none", clip_grad_norm=CLIP, accumulation=accumulation, **quiet)).fit((x, y))
        record[f"clip_acc{accumulation}"] = [t.detach().numpy().astype(np.float64).ravel().tolist()
                                             for t in model.state_dict().values()]

    # Metrics over an odd evaluation set (23 samples: 12 and 11 per rank, last batches short), against numpy
    # over the whole set with the final model, here on each rank
    x_eval, y_eval = eval_data()
    model, optimizer = torch_model_and_optimizer(seed=9 + launch_rank)
    adapter = TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy, metrics={"top2": torch_top2_hits})
    result = Trainer(adapter, TrainConfig(lr_scaling="none", **dict(quiet, epochs=1))).fit((x, y), (x_eval, y_eval))
    with torch.no_grad():
        logits = model(torch.from_numpy(x_eval)).double().numpy()
    record["metrics_odd"] = {"reported": result.eval, "expected": numpy_scores(logits, y_eval)}

    # Non-finite: an Inf loss (finite gradients) on rank 1 alone, in a model whose first layer is a sparse
    # embedding: the NaN that carries it must leave every rank's embedding gradient sparse
    tokens, labels = token_data()
    labels[plan_epoch(N, 1, 2, BATCH, 0, 0, 1)[BAD_STEP - 1].micro_batches[0][0]] = 99
    for nonfinite in ("stop", "skip"):
        torch.manual_seed(2)
        model = SparseBag()
        adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch_inf_when_label_is_99)
        trainer = Trainer(adapter, TrainConfig(lr_scaling="none", nonfinite=nonfinite, **dict(quiet, epochs=1)))
        try:
            result = trainer.fit((tokens, labels))
            record[f"sparse_{nonfinite}"] = {"skipped": result.skipped_steps, "steps": result.global_step,
                                             "params": [t.detach().numpy().astype(np.float64).ravel().tolist()
                                                        for t in model.state_dict().values()]}
        except StoppedOnEveryRank as e:
            record[f"sparse_{nonfinite}"] = {"stopped": str(e)}
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


def run_script(directory: str, script: str, args: List[str]) -> None:
    """Run ``script`` with ``args`` as its command line, every Trainer in it recording to ``directory``."""
    import runpy
    install(directory)
    script = os.path.abspath(script)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)   # as if the script had been started directly
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1] == "run":      # lr_checks.py run LOG_DIR SCRIPT [ARGS...]
        run_script(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:                         # lr_checks.py BACKEND OUT_DIR
        main(sys.argv[1], sys.argv[2])
