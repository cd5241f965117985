"""The epoch loop: steps from the feed through the adapter, per-step bookkeeping, commits, evaluation.

Framework-free and launcher-free: the same loop runs in a static job, inside Horovod's elastic retry
loop, and in one process at world size 1 (``LocalProcess``). Progress lives in ``run.progress``.

Example (what :meth:`hvdkit.Trainer.fit` does)::

    EpochLoop(trainer, run, train_feed, eval_feed, commit=lambda: ...).run()
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .errors import HvdkitError
from .resume import next_layout
from .run_state import Run


class EpochLoop:
    """Epochs from ``run.progress`` on; ``commit`` is called every N steps (N: ``commit_every`` in elastic
    mode, ``checkpoint_every`` otherwise) and at the end of each epoch."""

    def __init__(self, trainer, run: Run, train_feed, eval_feed, commit: Callable[[], None]):
        self.trainer, self.run_, self.train, self.eval = trainer, run, train_feed, eval_feed
        self._save = commit
        cfg = trainer.config
        self.every = cfg.commit_every if trainer.elastic else cfg.checkpoint_every

    def run(self) -> None:
        run, cfg = self.run_, self.trainer.config
        while run.progress["epoch"] < cfg.epochs and not run.stopped:
            if not self.epoch():
                break

    def commit(self) -> None:
        """On every rank: agree on the buffers, record every rank's random state, then commit or checkpoint."""
        t = self.trainer
        t.agree_buffers()
        self.run_.progress["rng"] = t.process.allgather_object(t.adapter.rng_state())
        self._save()

    def before_step(self, step) -> None:
        t, run = self.trainer, self.run_
        t.adapter.set_lr_factor(t.config.lr_factor(t.process.size, run.progress["global_step"]))
        if run.audit:  # before the step: a rank killed mid-step has recorded it; a rollback marker drops it
            run.audit.record(run.progress["epoch"], run.progress["global_step"] + 1, t.process.rank,
                             t.process.size, np.concatenate(step.micro_batches))

    def after_step(self, step, step_loss: float, step_count: int) -> bool:
        """Bookkeeping after each optimizer step; True asks the adapter to end the epoch now."""
        t, run, cfg = self.trainer, self.run_, self.trainer.config
        progress = run.progress
        run.trained += step.samples_in_step
        t.buffers_stale = True
        progress.update(position=step.end, global_step=progress["global_step"] + 1)
        if cfg.check_divergence and not run.checked_first:
            t.check_same_parameters("after the first step", buffers=False)
            run.checked_first = True
        for cb in t.active_callbacks:
            cb.on_step_end(t, progress["global_step"], step_loss / max(step_count, 1))
        if cfg.stop_after_steps and progress["global_step"] >= cfg.stop_after_steps:
            run.stopped = True
            return True
        if self.every and progress["global_step"] % self.every == 0 and step.end < self.train.n:
            self.commit()
        return False

    def _check_smallest_batch(self, epoch: int, start: int) -> None:
        """The same verdict on every rank, before any collective of the epoch: a short last step must not hand
        a model that cannot train on one sample (torch BatchNorm) a 1-sample batch on some rank."""
        t, cfg = self.trainer, self.trainer.config
        need = t.adapter.min_batch_samples()
        smallest = self.train.smallest_batch(cfg, t.process.size, start) if need > 1 else None
        if smallest is not None and smallest < need:
            raise HvdkitError(
                f"the last step of epoch {epoch + 1} gives some rank {smallest} sample(s) ({self.train.n} samples over "
                f"{t.process.size} workers x batch {cfg.batch_size}), and BatchNorm cannot train on fewer than {need}; "
                "pass sync_batchnorm=True (--sync-batchnorm), or a batch size or worker count that leaves each rank 0 or at least 2 samples")

    def epoch(self) -> bool:
        """One epoch (or its rest); False when the run stopped early inside it."""
        t, run, cfg = self.trainer, self.run_, self.trainer.config
        process, progress = t.process, run.progress
        epoch, resumed_at = progress["epoch"], progress["position"]
        progress["layout"] = next_layout(progress.get("layout"), resumed_at, process.size)
        steps = self.train.plan(epoch, resumed_at, cfg, process.rank, process.size, progress["layout"])
        self._check_smallest_batch(epoch, resumed_at)
        for cb in t.active_callbacks:
            cb.on_epoch_begin(t, epoch, len(steps))
        started = time.perf_counter()
        loss_sum, count = t.adapter.run_epoch(self.train, steps, self.before_step, self.after_step)
        sums = process.allreduce_sum(np.array([loss_sum, count], dtype=np.float64))
        elapsed = time.perf_counter() - started
        run.train_time += elapsed
        if run.stopped and progress["position"] < self.train.n:
            self.commit()
            return False
        if cfg.check_divergence:
            t.agree_buffers()
            t.check_same_parameters(f"at the end of epoch {epoch + 1}")
        # samples of this epoch: those trained since this (re)start plus those committed before it
        metrics = {"loss": float(sums[0] / max(sums[1], 1)), "train_samples": int(sums[1]) + resumed_at,
                   "samples_per_sec": float(sums[1]) / elapsed if elapsed else 0.0}
        if self.eval is not None:
            run.eval_metrics = t.evaluate(self.eval)
            metrics.update({f"eval_{k}": v for k, v in run.eval_metrics.items()})
        progress.update(epoch=epoch + 1, position=0, layout=[])
        self.commit()
        run.history.append(dict(metrics, epoch=epoch + 1))
        for cb in t.active_callbacks:
            cb.on_epoch_end(t, epoch, metrics)
        return True
