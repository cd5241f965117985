"""Worker for tests/test_torch_parallel.py: several checks in one launch (launches cost seconds).

argv: OUT_DIR. Each rank writes OUT_DIR/rank{r}.json with what it observed; the test asserts.
"""
import copy
import json
import os
import sys
import zlib

import numpy as np
import torch
from torch import nn

from hvdkit import HvdkitError, TrainConfig, Trainer
from hvdkit.sharding import plan_epoch
from hvdkit.torch import TorchAdapter

out_dir = sys.argv[1]
torch.set_num_threads(1)
rng = np.random.default_rng(7)
# 50 samples: not divisible by world (2) x batch (4) -> the last step is short (2 samples).
X = rng.normal(size=(50, 6)).astype(np.float32)
Y = rng.integers(0, 3, size=50).astype(np.int64)
X_EVAL = rng.normal(size=(37, 6)).astype(np.float32)
Y_EVAL = rng.integers(0, 3, size=37).astype(np.int64)


def model_and_opt(seed, momentum=0.9):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()]).double().numpy()


def reference(epochs, batch, accumulation, seed=0):
    """One process, no Horovod: batch = world x per-worker batch, plain torch, same sample order."""
    model, opt = model_and_opt(seed=123)
    for epoch in range(epochs):
        for step in plan_epoch(len(X), 0, 1, batch, seed, epoch, accumulation):
            opt.zero_grad()
            for ids in step.micro_batches:
                loss = nn.functional.cross_entropy(model(torch.from_numpy(X[ids])), torch.from_numpy(Y[ids]))
                (loss * len(ids) / step.samples_in_step).backward()
            opt.step()
    return model


def fit(cfg, seed_model=None, eval_data=None):
    # Each rank builds its model from a different seed: the broadcast from rank 0 must make them equal.
    model, opt = model_and_opt(seed=seed_model if seed_model is not None else 123 + 1000 * int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0))))
    adapter = TorchAdapter(model, opt, nn.functional.cross_entropy)
    result = Trainer(adapter, cfg).fit((X, Y), eval_data)
    return adapter, model, result


record = {}
quiet = dict(progress_bar=False, lr_scaling="none", seed=0)

# 1. Gradient equivalence (with the short last step), plain and with 2-step accumulation.
for name, accumulation in (("plain", 1), ("accumulation", 2)):
    adapter, model, result = fit(TrainConfig(epochs=3, batch_size=4, accumulation=accumulation, **quiet))
    world = adapter.size
    ref = reference(3, 4 * world, accumulation)
    record[f"equiv_{name}_maxdiff"] = float(np.abs(flat(model) - flat(ref)).max())
    record[f"equiv_{name}_steps"] = result.global_step
    record[f"equiv_{name}_samples"] = result.train_samples_per_epoch
record["rank"], record["size"] = adapter.rank, adapter.size
record["checksum"] = zlib.crc32(flat(model).tobytes())

# 2. Exact evaluation: every eval sample counted once, metrics equal to a one-process evaluation.
adapter, model, result = fit(TrainConfig(epochs=1, batch_size=4, eval_batch_size=5, **quiet), eval_data=(X_EVAL, Y_EVAL))
with torch.no_grad():
    out = model(torch.from_numpy(X_EVAL))
    record["eval_expected_accuracy"] = float((out.argmax(1) == torch.from_numpy(Y_EVAL)).float().mean())
    record["eval_expected_loss"] = float(nn.functional.cross_entropy(out, torch.from_numpy(Y_EVAL)))
record["eval"] = result.eval

# 3. Checkpoint mid-epoch and resume == uninterrupted (deterministic settings).
ckpt_a, ckpt_b = os.path.join(out_dir, "ckpt_a"), os.path.join(out_dir, "ckpt_b")
_, model_a, _ = fit(TrainConfig(epochs=3, batch_size=4, checkpoint_dir=ckpt_a, **quiet))
_, _, stopped = fit(TrainConfig(epochs=3, batch_size=4, checkpoint_dir=ckpt_b, stop_after_steps=9, **quiet))
# A fresh model with other weights: everything must come from the checkpoint.
_, model_b, resumed = fit(TrainConfig(epochs=3, batch_size=4, checkpoint_dir=ckpt_b, **quiet), seed_model=999)
record["resume_stopped_early"] = stopped.stopped_early
record["resume_from"] = {k: resumed.resumed_from[k] for k in ("epoch", "position", "global_step")}
record["resume_maxdiff"] = float(np.abs(flat(model_a) - flat(model_b)).max())
record["resume_final_step"] = resumed.global_step

# 4. Corrupt newest checkpoint: reported, the previous one is used. Then all corrupt: clear error everywhere.
if adapter.rank == 0:
    files = sorted(f for f in os.listdir(ckpt_a) if f.endswith(".bin"))
    with open(os.path.join(ckpt_a, files[-1]), "r+b") as f:
        f.truncate(100)
    record["corrupted_file"] = files[-1]
_, _, fallback = fit(TrainConfig(epochs=4, batch_size=4, checkpoint_dir=ckpt_a, **quiet))
record["fallback_resumed_from"] = fallback.resumed_from["file"]
record["fallback_epochs"] = fallback.epochs_done
if adapter.rank == 0:
    for f in os.listdir(ckpt_a):
        if f.endswith(".bin"):
            with open(os.path.join(ckpt_a, f), "r+b") as fh:
                fh.truncate(10)
try:
    fit(TrainConfig(epochs=5, batch_size=4, checkpoint_dir=ckpt_a, **quiet))
    record["all_corrupt_error"] = None
except HvdkitError as e:
    record["all_corrupt_error"] = str(e)

# 5. Divergence check: make rank 1 differ on purpose, the check must name the rank and the tensor.
if adapter.size > 1:
    model, opt = model_and_opt(seed=5)
    adapter = TorchAdapter(model, opt, nn.functional.cross_entropy)
    trainer = Trainer(adapter, TrainConfig(**quiet))
    adapter.init(seed=0, threads=1)
    adapter.prepare(lr_factor=1.0, accumulation=1)
    if adapter.rank == 1:
        with torch.no_grad():
            model[2].bias.add_(1.0)
    try:
        trainer.check_same_parameters("in the test")
        record["divergence_error"] = None
    except HvdkitError as e:
        record["divergence_error"] = str(e)

with open(os.path.join(out_dir, f"rank{adapter.rank}.json"), "w") as f:
    json.dump(record, f)
