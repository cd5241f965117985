"""What every training script shares: the common flags, one-line errors, the metrics JSON.

Example::

    parser = training_parser("train digits", epochs=20, batch_size=32, lr=0.05)
    args = parser.parse_args()
    cfg = config_from_args(args)
    ...
    Trainer(adapter, cfg, callbacks=[MetricsFile(args.metrics_json)]).fit(train, test)
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Optional

from .callbacks import Callback
from .checkpoint import atomic_write
from .config import TrainConfig
from .errors import HvdkitError, OneLineParser, RankFailed


def _learning_rate(text: str) -> float:
    """``--lr``: a finite number > 0 (NaN trains garbage without a word, a negative LR is torch's traceback)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text!r}), e.g. --lr 0.05")
    return value


def training_parser(description: str, epochs: int, batch_size: int, lr: float) -> argparse.ArgumentParser:
    p = OneLineParser(description=description)   # a usage error is one line, not the usage block per rank
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size, help="samples per worker per step")
    p.add_argument("--lr", type=_learning_rate, default=lr, help="learning rate for one worker (scaled by --lr-scaling)")
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
    p.add_argument("--clip-grad-norm", type=float, default=None,
                   help="clip the averaged gradients to this global L2 norm (default: no clipping)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="none",
                   help="step: LR x0.1 every --lr-decay-steps optimizer steps; cosine: from --lr to 0 over "
                        "--lr-decay-steps steps (then 0); both times the --lr-scaling/--warmup-steps factor")
    p.add_argument("--lr-decay-steps", type=int, default=1000, help="optimizer steps of --lr-schedule")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: forward pass and loss in bfloat16 (torch autocast, Keras mixed_bfloat16); weights, "
                        "gradients and their allreduce stay float32")
    p.add_argument("--keep-best", type=int, default=0,
                   help="also keep the K best checkpoints by --monitor in CHECKPOINT_DIR/best (needs --checkpoint-dir)")
    p.add_argument("--monitor", default="eval_loss",
                   help="epoch metric for --keep-best and early stopping: eval_loss, eval_accuracy, eval_<metric>, "
                        "or loss (training)")
    p.add_argument("--monitor-mode", choices=["min", "max"], default=None,
                   help="whether --monitor should go down or up (default: min for *loss*/*error*, max for "
                        "*accuracy*/*top*)")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="early stopping: an improvement must beat the best by more than this")
    p.add_argument("--early-stopping-patience", type=int, default=0,
                   help="stop after N evaluations in a row without improvement of --monitor (0: never)")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="ZeRO stage 2 (torch and Keras): each rank keeps 1/N of the optimizer state and of the "
                        "reduced gradients; same result; static checkpoints are written as one shard per rank")
    p.add_argument("--nonfinite", choices=["stop", "skip", "off"], default="stop",
                   help="a NaN/Inf loss or gradient norm: stop every rank at that step (exit non-zero), skip that "
                        "step's update on every rank, or off (no check)")
    return p


OPTIMIZERS = ("sgd", "adam", "adamw")
WEIGHT_DECAY = 0.01   # --optimizer adamw's (the default of torch's AdamW)


def optimizer_flag(parser: argparse.ArgumentParser, default: str = "sgd") -> None:
    """Add ``--optimizer`` to a script's parser; build it with :func:`torch_optimizer` or :func:`keras_optimizer`.

    Example::

        parser = training_parser("train digits", epochs=20, batch_size=32, lr=0.05)
        optimizer_flag(parser)
        args = parser.parse_args()
        optimizer = torch_optimizer(args, model.parameters())
    """
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=default,
                        help=f"sgd (momentum 0.9), adam, or adamw (weight decay {WEIGHT_DECAY}); --lr is its LR for "
                             "one worker (Adam wants a smaller one than SGD, e.g. 0.002)")


def reducer_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--reducer`` (torch scripts) for ``TorchAdapter(reducer=args.reducer)``.

    Example::

        reducer_flag(parser)
        adapter = TorchAdapter(model, optimizer, loss_fn, reducer=parser.parse_args().reducer)
    """
    parser.add_argument("--reducer", choices=["horovod", "buckets"], default="horovod",
                        help="torch gradient averaging: Horovod's DistributedOptimizer, one allreduce per parameter "
                             "(horovod), or grouped allreduces of ~256 KiB buckets launched during backward (buckets)")


def torch_optimizer(args: argparse.Namespace, params):
    """The torch optimizer ``--optimizer --lr`` name (see :func:`optimizer_flag`)."""
    import torch
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=WEIGHT_DECAY)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9)


def keras_optimizer(args: argparse.Namespace):
    """The Keras optimizer ``--optimizer --lr --lr-schedule`` name (see :func:`optimizer_flag`)."""
    import keras
    lr = keras_learning_rate(args)
    if args.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if args.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=WEIGHT_DECAY)
    return keras.optimizers.SGD(lr, momentum=0.9)


LR_SCHEDULES = ("none", "step", "cosine")


def scheduled_lr(schedule: str, lr: float, decay_steps: int, step: int) -> float:
    """The LR ``--lr-schedule`` gives optimizer step ``step`` (0-based) before the world-size/warmup factor: the
    formula both :func:`torch_lr_scheduler` and :func:`keras_learning_rate` implement."""
    if schedule == "step":
        return lr * 0.1 ** (step // decay_steps)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, decay_steps) / decay_steps))
    return lr


def _check_schedule(args: argparse.Namespace) -> None:
    if args.lr_schedule != "none" and args.lr_decay_steps < 1:
        raise HvdkitError(f"--lr-decay-steps must be >= 1 (got {args.lr_decay_steps}); pass e.g. --lr-decay-steps 1000")


def torch_lr_scheduler(args: argparse.Namespace, optimizer):
    """The torch scheduler ``--lr-schedule`` asks for (None for none); pass it to ``TorchAdapter(scheduler=...)``
    with the default ``scheduler_interval="step"``."""
    _check_schedule(args)
    if args.lr_schedule == "none":
        return None
    import torch
    if args.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_decay_steps, gamma=0.1)
    steps = args.lr_decay_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: scheduled_lr("cosine", 1.0, steps, t))


def keras_learning_rate(args: argparse.Namespace):
    """The Keras optimizer's ``learning_rate`` for ``--lr --lr-schedule``: a float, or a ``LearningRateSchedule``."""
    _check_schedule(args)
    if args.lr_schedule == "none":
        return args.lr
    import keras
    if args.lr_schedule == "step":
        return keras.optimizers.schedules.ExponentialDecay(args.lr, args.lr_decay_steps, 0.1, staircase=True)
    return keras.optimizers.schedules.CosineDecay(args.lr, args.lr_decay_steps)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, accumulation=args.accumulation,
        lr_scaling=args.lr_scaling, warmup_steps=args.warmup_steps, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, stop_after_steps=args.stop_after_steps,
        tensorboard_dir=args.tensorboard_dir, progress_bar=not args.no_progress and sys.stderr.isatty(),
        commit_every=args.commit_every, durable_every=args.durable_every, audit_dir=args.audit_dir,
        sync_batchnorm=args.sync_batchnorm, clip_grad_norm=args.clip_grad_norm,
        precision=args.precision, keep_best=args.keep_best, monitor=args.monitor, monitor_mode=args.monitor_mode,
        min_delta=args.min_delta, early_stopping_patience=args.early_stopping_patience, nonfinite=args.nonfinite,
        shard_optimizer=args.shard_optimizer)


def write_metrics(path: Optional[str], result, framework: str, rank: int, **extra: Any) -> Dict[str, Any]:
    """The run's summary; rank 0 writes it atomically to ``path`` (when given). Returns it on every rank."""
    metrics = {
        "framework": framework, "world_size": result.world_size, "epochs": result.epochs_done,
        "global_step": result.global_step, "global_batch_size": result.global_batch_size,
        "train_samples_per_epoch": result.train_samples_per_epoch,
        "test_accuracy": result.eval.get("accuracy"), "test_loss": result.eval.get("loss"),
        "test_samples": result.eval.get("samples"), "samples_per_sec": round(result.samples_per_sec, 1),
        "stopped_early": result.stopped_early, "best": result.best, "skipped_steps": result.skipped_steps,
        "resumed": bool(result.resumed_from), "resets": result.resets,
        "optimizer_state_bytes": result.optimizer_state_bytes, "history": result.history, **extra}
    if path and rank == 0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            atomic_write(path, (json.dumps(metrics, indent=1) + "\n").encode())
        except OSError as e:
            raise _unwritable_metrics(path, e) from None
    return metrics


def _unwritable_metrics(path: str, error: OSError) -> HvdkitError:
    # makedirs meeting a regular file says "File exists", which names neither the file nor the problem
    why = "part of the path is a file" if isinstance(error, FileExistsError) else error.strerror
    return HvdkitError(f"cannot write the metrics file {path} ({why}); pass a writable --metrics-json")


def check_metrics_path(path: str) -> None:
    """Raise one line now, not after training, when the metrics file could not be written (rank 0)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise HvdkitError(f"--metrics-json {path} is a directory; pass a file name, e.g. "
                          f"{os.path.join(path, 'metrics.json')}")
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-").close()
    except OSError as e:
        raise _unwritable_metrics(path, e) from None


def limit_train(args: argparse.Namespace, *arrays):
    """``arrays`` cut to the first ``--limit-train`` samples (unchanged without the flag); a limit below 1 or
    above the number of samples is an error, not a silent slice."""
    k, n = args.limit_train, len(arrays[0])
    if k is None:
        return arrays
    if k < 1:
        raise HvdkitError(f"--limit-train {k}: the training dataset is empty; pass --limit-train 1 or more, "
                          "or drop it to use all samples" if k == 0 else
                          f"--limit-train must be >= 1 (got {k}); pass the number of training samples to use")
    if k > n:
        raise HvdkitError(f"--limit-train {k} is more than the {n} training samples; pass at most {n}, "
                          "or drop it to use them all")
    return tuple(a[:k] for a in arrays)


class MetricsFile(Callback):
    """Rank 0 writes the run's metrics JSON at the very end of ``fit``, inside the run: in an elastic job a
    rank 0 lost before the file is complete is replaced, and the new rank 0 writes it.

    Example::

        Trainer(adapter, cfg, callbacks=[MetricsFile(args.metrics_json, mode="fit")]).fit(train, test)
    """

    def __init__(self, path: Optional[str], **extra: Any):
        self.path, self.extra = path, extra

    def on_train_begin(self, trainer) -> None:
        if self.path:   # rank 0, before any step: a path that cannot be written fails now, not after training
            check_metrics_path(self.path)

    def on_train_end(self, trainer, result) -> None:
        write_metrics(self.path, result, trainer.adapter.framework, trainer.process.rank, **self.extra)


def summary_line(result) -> str:
    """What a digits example prints at the end; a run stopped before any evaluation says where it stopped."""
    speed = f"{result.samples_per_sec:.0f} samples/s on {result.world_size} workers"
    if "accuracy" in result.eval:
        return f"test accuracy {result.eval['accuracy']:.4f} on {result.eval['samples']} samples, {speed}"
    return f"stopped at step {result.global_step} before evaluating (resume with the same --checkpoint-dir), {speed}"


def main_guard(fn: Callable[[], Any]) -> Callable[[], None]:
    """Decorator for a script's main: an HvdkitError becomes one line on stderr and exit code 2 (bad input), or 1
    when it reports a rank that failed (:class:`hvdkit.errors.RankFailed`: a bug, whose traceback that rank
    printed)."""
    @functools.wraps(fn)
    def wrapper():
        try:
            fn()
        except HvdkitError as e:
            print(f"hvdkit: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1 if isinstance(e, RankFailed) else 2)
    return wrapper
