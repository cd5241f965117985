"""Training settings shared by every adapter, validated before anything runs.

Example::

    cfg = TrainConfig(epochs=5, batch_size=64, lr_scaling="linear", warmup_steps=50)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

from .errors import HvdkitError

LrScaling = Union[str, Callable[[int], float]]
PRECISIONS = ("fp32", "bf16")
NONFINITE = ("stop", "skip", "off")


@dataclasses.dataclass
class TrainConfig:
    """What the trainer does; every field has a default a user would expect.

    batch_size: samples per worker per backward pass; the global batch is
        ``batch_size * world_size * accumulation``.
    lr_scaling: "linear" (LR x world size, Goyal et al.), "none", or ``f(world_size) -> factor``.
    warmup_steps: ramp the LR factor linearly from 1 to its scaled value over this many steps.
    checkpoint_every: also checkpoint every N optimizer steps (0: only at the end of each epoch).
    stop_after_steps: end the run after this many global steps (to split a run in tests and demos).
    elastic: run inside Horovod's elastic loop; None: when started by an elastic horovodrun.
    commit_every: elastic only: commit the state in memory every N steps (and at each epoch end).
    durable_every: elastic only: also write every k-th commit to ``checkpoint_dir`` (when set).
    audit_dir: record the sample ids each rank trains on, for ``hvdkit audit`` (exactly-once proof).
    sync_batchnorm: BatchNorm layers compute their batch statistics over all ranks (torch and Keras);
        without it each rank normalises by its own batch and running statistics are averaged over ranks
        before every evaluation, commit and checkpoint.
    clip_grad_norm: clip the gradients, after they are averaged over ranks, to this global L2 norm (all
        parameters together; the same on every rank); None: no clipping.
    precision: "fp32", or "bf16": forward pass and loss in bfloat16 (torch autocast; Keras' ``mixed_bfloat16``
        policy, set with ``hvdkit.keras.use_precision`` before the model is built); weights, gradients,
        the optimizer and the gradient allreduce stay float32.
    keep_best: also keep the ``keep_best`` best checkpoints by ``monitor`` in ``checkpoint_dir/best/`` (0: off).
    monitor: the epoch metric ``keep_best`` and early stopping watch: a key of the epoch's metrics, e.g.
        "eval_loss", "eval_accuracy", "eval_<your metric>", or "loss" (training loss).
    monitor_mode: "min" or "max"; None: "min" for a name containing loss, error, mae or mse, "max" for one
        containing accuracy, top, auc, precision, recall or f1 (otherwise it must be given).
    min_delta: early stopping counts an evaluation as an improvement only if it beats the best by more than this.
    early_stopping_patience: stop after this many evaluations in a row without improvement (0: never).
    nonfinite: a NaN/Inf loss or gradient norm in a step: "stop" every rank at that step (exit non-zero, the last
        good checkpoint kept), "skip" that step's update on every rank, or "off" (no check).
    shard_optimizer: ZeRO stage 2 (torch and Keras, loop and fit): gradients are reduce-scattered, each rank
        holds and steps 1/N of the optimizer state, updated parameters are allgathered; the same result as without
        it. Elementwise optimizers only (torch: SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam, RAdam; Keras:
        SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, Nadam, Lion, Adadelta, Ftrl), op="average". Checkpoints
        stay unsharded (they resume at any world size, sharded or not).

    The LR an optimizer step applies is ``schedule(step) * lr_factor(world_size, global_step)``: the user's
    schedule (a torch LR scheduler, a Keras ``LearningRateSchedule``, or the constant LR) times the
    world-size factor ramped up by warmup (see :meth:`lr_factor`).
    """
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    seed: int = 0
    shuffle: bool = True
    accumulation: int = 1
    lr_scaling: LrScaling = "linear"
    warmup_steps: int = 0
    threads: int = 1
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = True
    stop_after_steps: Optional[int] = None
    check_divergence: bool = True
    progress_bar: bool = True
    tensorboard_dir: Optional[str] = None
    log_every: int = 0
    elastic: Optional[bool] = None
    commit_every: int = 10
    durable_every: int = 1
    audit_dir: Optional[str] = None
    sync_batchnorm: bool = False
    clip_grad_norm: Optional[float] = None
    precision: str = "fp32"
    keep_best: int = 0
    monitor: str = "eval_loss"
    monitor_mode: Optional[str] = None
    min_delta: float = 0.0
    early_stopping_patience: int = 0
    nonfinite: str = "stop"
    shard_optimizer: bool = False

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise HvdkitError(msg)
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs}); pass --epochs 1 or more")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be >= 1 (got {self.batch_size}); pass e.g. --batch-size 32")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1 (got {self.eval_batch_size})")
        need(self.accumulation >= 1, f"accumulation must be >= 1 (got {self.accumulation}); pass e.g. --accumulation 1")
        need(self.threads >= 1, f"threads must be >= 1 (got {self.threads})")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps}); pass e.g. --warmup-steps 0")
        need(self.checkpoint_every >= 0,
             f"checkpoint_every must be >= 0 (got {self.checkpoint_every}); pass e.g. --checkpoint-every 0 (epoch ends only)")
        need(self.commit_every >= 1, f"commit_every must be >= 1 (got {self.commit_every}); pass e.g. --commit-every 10")
        need(self.durable_every >= 1, f"durable_every must be >= 1 (got {self.durable_every}); pass e.g. --durable-every 1")
        need(self.stop_after_steps is None or self.stop_after_steps >= 1,
             f"stop_after_steps must be >= 1 (got {self.stop_after_steps}); pass e.g. --stop-after-steps 10, or drop it")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1 (got {self.keep_checkpoints})")
        need(callable(self.lr_scaling) or self.lr_scaling in ("linear", "none"),
             f"lr_scaling must be 'linear', 'none' or a function of the world size (got {self.lr_scaling!r})")
        need(self.clip_grad_norm is None or (isinstance(self.clip_grad_norm, (int, float))
                                             and not isinstance(self.clip_grad_norm, bool) and self.clip_grad_norm > 0),
             f"clip_grad_norm must be a number > 0 or None (got {self.clip_grad_norm!r}); pass e.g. --clip-grad-norm 1.0")
        need(self.precision in PRECISIONS,
             f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r}); pass --precision fp32 or bf16")
        need(isinstance(self.keep_best, int) and self.keep_best >= 0,
             f"keep_best must be >= 0 (got {self.keep_best!r}); pass e.g. --keep-best 3")
        need(not self.keep_best or self.checkpoint_dir,
             "keep_best needs a checkpoint directory (the best checkpoints go to its best/ subdirectory); "
             "pass --checkpoint-dir")
        need(isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 0,
             f"early_stopping_patience must be >= 0 (got {self.early_stopping_patience!r}); "
             "pass e.g. --early-stopping-patience 3")
        need(isinstance(self.min_delta, (int, float)) and not isinstance(self.min_delta, bool) and self.min_delta >= 0,
             f"min_delta must be a number >= 0 (got {self.min_delta!r}); pass e.g. --min-delta 0.001, or 0 for any improvement")
        need(self.monitor_mode in (None, "min", "max"),
             f"monitor_mode must be 'min' or 'max' (got {self.monitor_mode!r}); pass --monitor-mode min or max")
        need(isinstance(self.monitor, str) and self.monitor, f"monitor must be a metric name (got {self.monitor!r})")
        if self.keep_best or self.early_stopping_patience:
            need(self.monitor_direction() is not None,
                 f"cannot tell whether {self.monitor} should go up or down; pass --monitor-mode min or max")
        need(self.nonfinite in NONFINITE,
             f"nonfinite must be one of {', '.join(NONFINITE)} (got {self.nonfinite!r}); pass --nonfinite stop, skip or off")
        need(isinstance(self.shard_optimizer, bool),
             f"shard_optimizer must be True or False (got {self.shard_optimizer!r}); pass --shard-optimizer or not")
        return self

    def monitor_direction(self) -> Optional[str]:
        """``monitor_mode``, or guessed from the name ("loss": min, "accuracy": max); None if it cannot be."""
        if self.monitor_mode is not None:
            return self.monitor_mode
        name = self.monitor.lower()
        if any(word in name for word in ("loss", "error", "mae", "mse")):
            return "min"
        return "max" if any(word in name for word in ("accuracy", "top", "auc", "precision", "recall", "f1")) else None

    def lr_factor(self, world_size: int, global_step: int) -> float:
        """LR multiplier at ``global_step``: the scaled factor, ramped up over ``warmup_steps``."""
        if callable(self.lr_scaling):
            target = float(self.lr_scaling(world_size))
        else:
            target = float(world_size) if self.lr_scaling == "linear" else 1.0
        if self.warmup_steps and global_step < self.warmup_steps:
            return 1.0 + (target - 1.0) * (global_step + 1) / self.warmup_steps
        return target
