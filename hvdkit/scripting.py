"""What every training script shares: the common flags, one-line errors, the metrics JSON.

Example::

    parser = training_parser("train digits", epochs=20, batch_size=32, lr=0.05)
    args = parser.parse_args()
    cfg = config_from_args(args)
    ...
    write_metrics(args.metrics_json, result, framework="torch", rank=result.rank)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Callable, Dict, Optional

from .checkpoint import atomic_write
from .config import TrainConfig
from .errors import HvdkitError


def training_parser(description: str, epochs: int, batch_size: int, lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size, help="samples per worker per step")
    p.add_argument("--lr", type=float, default=lr, help="learning rate for one worker (scaled by --lr-scaling)")
    p.add_argument("--lr-scaling", choices=["linear", "none"], default="linear")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accumulation", type=int, default=1, help="backward passes per optimizer step")
    p.add_argument("--compression", choices=["none", "fp16"], default="none")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--stop-after-steps", type=int, default=None, help="end early (to resume later)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--metrics-json", default=None, help="rank 0 writes the run's metrics here")
    p.add_argument("--tensorboard-dir", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--commit-every", type=int, default=10, help="elastic: commit state every N steps")
    p.add_argument("--durable-every", type=int, default=1,
                   help="elastic: write every k-th commit to --checkpoint-dir")
    p.add_argument("--audit-dir", default=None, help="record trained sample ids (check with `hvdkit audit`)")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="BatchNorm statistics over all ranks' samples (not each rank's own batch)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, accumulation=args.accumulation,
        lr_scaling=args.lr_scaling, warmup_steps=args.warmup_steps, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, stop_after_steps=args.stop_after_steps,
        tensorboard_dir=args.tensorboard_dir, progress_bar=not args.no_progress and sys.stderr.isatty(),
        commit_every=args.commit_every, durable_every=args.durable_every, audit_dir=args.audit_dir,
        sync_batchnorm=args.sync_batchnorm)


def write_metrics(path: Optional[str], result, framework: str, rank: int, **extra: Any) -> Dict[str, Any]:
    """The run's summary; rank 0 writes it atomically to ``path`` (when given). Returns it on every rank."""
    metrics = {
        "framework": framework, "world_size": result.world_size, "epochs": result.epochs_done,
        "global_step": result.global_step, "global_batch_size": result.global_batch_size,
        "train_samples_per_epoch": result.train_samples_per_epoch,
        "test_accuracy": result.eval.get("accuracy"), "test_loss": result.eval.get("loss"),
        "test_samples": result.eval.get("samples"), "samples_per_sec": round(result.samples_per_sec, 1),
        "stopped_early": result.stopped_early,
        "resumed": bool(result.resumed_from), "resets": result.resets, "history": result.history, **extra}
    if path and rank == 0:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        atomic_write(path, (json.dumps(metrics, indent=1) + "\n").encode())
    return metrics


def summary_line(result) -> str:
    """What a digits example prints at the end; a run stopped before any evaluation says where it stopped."""
    speed = f"{result.samples_per_sec:.0f} samples/s on {result.world_size} workers"
    if "accuracy" in result.eval:
        return f"test accuracy {result.eval['accuracy']:.4f} on {result.eval['samples']} samples, {speed}"
    return f"stopped at step {result.global_step} before evaluating (resume with the same --checkpoint-dir), {speed}"


def main_guard(fn: Callable[[], Any]) -> Callable[[], None]:
    """Decorator for a script's main: an HvdkitError becomes one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper():
        try:
            fn()
        except HvdkitError as e:
            print(f"hvdkit: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    return wrapper
