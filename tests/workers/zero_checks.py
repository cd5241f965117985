"""Sharded optimizer (ZeRO stage 2) checks: models and runs shared by tests/test_zero_torch.py and its launches.

As a module: :func:`model` (an Embedding larger than a shard, LayerNorm, optional BatchNorm, an odd parameter
count, two param groups), :func:`optimizer_for`, :func:`data`, :func:`fit` and :func:`flat`.

As a script (argv: OUT_DIR CHECKPOINT_DIR [RESUME_DIR]), under horovodrun at N workers: every rank writes
OUT_DIR/rank{r}.json with
- ``equal``: for Adam and SGD+momentum, the largest parameter difference between a sharded and an unsharded run
  from the same seeds (the SGD one with clipping, accumulation 2 and a step LR schedule), and the per-rank
  optimizer state bytes of both;
- ``checkpoint``: a sharded Adam run on the global batch of :data:`GLOBAL_BATCH` samples (any world size trains
  the same steps) written to CHECKPOINT_DIR after :data:`STOP_AT` steps; with RESUME_DIR, that run resumed from
  RESUME_DIR (written at another world size) to the end instead; its final parameters.
"""
import json
import os
import sys

import numpy as np
import torch

from hvdkit import TrainConfig, Trainer
from hvdkit.torch import TorchAdapter

N = 96                  # samples: every step below is full at 1, 2 and 3 workers (no short last step)
GLOBAL_BATCH = 12       # samples per optimizer step at every world size (1, 2, 3 workers: batch 12, 6, 4)
STOP_AT = 5             # the checkpoint run stops (and writes) here, in its first epoch
QUIET = dict(progress_bar=False, seed=3, epochs=2, check_divergence=True)
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


def fit(name: str, shard: bool, process=None, batchnorm: bool = True, scheduler: bool = False, **config):
    """One run from fixed seeds: (model, adapter, FitResult)."""
    net = model(batchnorm=batchnorm)
    optimizer = optimizer_for(name, net)
    steplr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7) if scheduler else None
    adapter = TorchAdapter(net, optimizer, torch.nn.functional.cross_entropy, scheduler=steplr)
    cfg = TrainConfig(**dict(QUIET, **config), shard_optimizer=shard)
    result = Trainer(adapter, cfg, process=process).fit(data())
    return net, adapter, result


def checkpoint_run(size: int, checkpoint_dir: str, process=None, stop: bool = True):
    """The sharded Adam run on GLOBAL_BATCH samples per step (no BatchNorm: per-rank batch statistics would
    depend on the world size), stopping after STOP_AT steps or (``stop=False``) running or resuming to the end."""
    return fit("adam", True, process=process, batchnorm=False, lr_scaling="none", batch_size=GLOBAL_BATCH // size,
               checkpoint_dir=checkpoint_dir, stop_after_steps=STOP_AT if stop else None)


def main(out_dir: str, checkpoint_dir: str, resume_dir: str = None) -> None:
    record = {"equal": {}}
    size = rank = None
    for name, extra in EQUAL_RUNS.items():
        plain_net, plain, _ = fit(name, False, **extra)
        sharded_net, sharded, result = fit(name, True, **extra)
        size, rank = sharded.process.size, sharded.process.rank
        record["equal"][name] = {
            "max_diff": float(np.abs(flat(plain_net) - flat(sharded_net)).max()),
            "unsharded_bytes": plain.optimizer_state_bytes(), "sharded_bytes": sharded.optimizer_state_bytes(),
            "result_bytes": result.optimizer_state_bytes, "steps": result.global_step,
            "params": int(sum(p.numel() for p in sharded_net.parameters()))}
    if resume_dir is None:
        net, _, result = checkpoint_run(size, checkpoint_dir)
    else:
        net, _, result = checkpoint_run(size, resume_dir, stop=False)
        record["resumed_from_world"] = result.resumed_from["saved_world_size"] if result.resumed_from else None
    record["checkpoint"] = {"params": flat(net).tolist(), "steps": result.global_step}
    record.update(rank=rank, size=size)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
