"""The epoch loop: steps from the feed through the adapter, per-step bookkeeping, commits, evaluation.

Framework-free and launcher-free: the same loop runs in a static job, inside Horovod's elastic retry
loop, and in one process at world size 1 (``LocalProcess``). Progress lives in ``run.progress``.

Example (what :meth:`hvdkit.Trainer.fit` does)::

    EpochLoop(trainer, run, train_feed, eval_feed, commit=lambda: ...).run()
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .errors import HvdkitError, StoppedOnEveryRank
from .monitor import should_stop, stop_line, update_record, watching
from .resume import next_layout
from .run_state import Run


# nonfinite="skip" gives up after this many non-finite steps in a row: the model is not coming back
SKIP_LIMIT = 10


class EpochLoop:
    """Epochs from ``run.progress`` on; ``commit`` is called every N steps (N: ``commit_every`` in elastic
    mode, ``checkpoint_every`` otherwise) and at the end of each epoch."""

    def __init__(self, trainer, run: Run, train_feed, eval_feed, commit: Callable[[], None]):
        self.trainer, self.run_, self.train, self.eval = trainer, run, train_feed, eval_feed
        self._save = commit
        cfg = trainer.config
        self.every = cfg.commit_every if trainer.elastic else cfg.checkpoint_every
        self._finite_at = None  # the global step whose state was last found finite
        self._skipped_in_row = 0

    def run(self) -> None:
        run, cfg = self.run_, self.trainer.config
        if run.progress["epoch"] < cfg.epochs and should_stop(run.progress.get("best"), cfg):
            # a commit or checkpoint written when early stopping ended the run (a resume, a rollback after it)
            run.stopped = True
            self.trainer.log.info(stop_line(run.progress["best"], cfg, run.progress["epoch"]) + " (recorded)")
        while run.progress["epoch"] < cfg.epochs and not run.stopped:
            if not self.epoch():
                break

    def commit(self, evaluated: Optional[Tuple[Dict[str, float], int]] = None) -> bool:
        """On every rank: agree on the buffers, record every rank's random state, then commit or checkpoint.
        After an evaluation (``evaluated``: its metrics and 1-based epoch) the monitored metric is watched in
        between, so a best checkpoint is this very state, random state included; returns the early-stopping
        verdict."""
        t = self.trainer
        t.agree_buffers()
        self.check_finite("")
        self.run_.progress["rng"] = t.process.allgather_object(t.adapter.rng_state())
        stop = self.watch(*evaluated) if evaluated is not None else False
        self._save()
        return stop

    # ---- non-finite steps (TrainConfig.nonfinite) ---------------------------------------------
    def _last_good(self) -> str:
        """Rank 0's newest checkpoint, the same words on every rank (one broadcast, on the way to stopping)."""
        t = self.trainer
        path = t.process.broadcast_object(t.last_checkpoint if t.process.rank == 0 else None)
        return f"the last good checkpoint is {path}" if path else \
            "no checkpoint was written (pass --checkpoint-dir to keep one)"

    def check_finite(self, when: str) -> None:
        """Before anything is evaluated, kept or committed: every parameter and (agreed) buffer finite, or every
        rank stops here with the same line; nothing non-finite is ever committed or checkpointed."""
        t, run = self.trainer, self.run_
        step = run.progress["global_step"]
        if t.config.nonfinite == "off" or self._finite_at == step:
            return
        t.agree_buffers()  # the same buffers on every rank, so the same verdict
        if not t.adapter.state_finite(buffers=True):
            raise StoppedOnEveryRank(
                f"non-finite parameters or buffers at epoch {run.progress['epoch'] + 1}, step {step}{when} (an update "
                f"applied a NaN or Inf: check --lr and its schedule); stopped on every rank, nothing of this state "
                f"was saved; {self._last_good()}")
        self._finite_at = step

    def _nonfinite_step(self, step_loss: float, step_count: int, grad_norm) -> None:
        """The step just run had a non-finite loss on some rank or a non-finite averaged gradient norm: a verdict
        every rank reached alike (see the adapters), so every rank is here. Stop, or (``skip``) go on without it."""
        t, run, cfg = self.trainer, self.run_, self.trainer.config
        progress = run.progress
        losses = t.process.allgather_object(float(step_loss) if step_count else 0.0)
        bad = [rank for rank, loss in enumerate(losses) if not math.isfinite(loss)]
        where = f"epoch {progress['epoch'] + 1}, step {progress['global_step']}"
        what = (f"non-finite loss ({losses[bad[0]]:g} on rank{'s' if len(bad) > 1 else ''} "
                f"{', '.join(map(str, bad))})" if bad else
                f"non-finite gradient norm ({grad_norm:g}; every rank's loss finite)" if grad_norm is not None else
                "non-finite gradients")
        if cfg.nonfinite == "stop":
            # Adasum combines the ranks' updates inside the step: it was applied before anyone could check it
            applied = "after Adasum applied it" if getattr(t.adapter, "op", "average") == "adasum" else \
                "without applying it"
            raise StoppedOnEveryRank(
                f"{what} at {where}; stopped on every rank {applied} (lower --lr, pass --clip-grad-norm, "
                f"or --nonfinite skip to skip such steps); {self._last_good()}")
        progress["skipped"] = int(progress.get("skipped", 0)) + 1
        t.log.info(f"skipped step {progress['global_step']} (epoch {progress['epoch'] + 1}) on every rank: {what}; "
                      f"{progress['skipped']} skipped so far")
        if not t.adapter.state_finite(buffers=False):  # the parameters themselves: skipping cannot help
            raise StoppedOnEveryRank(
                f"{what} at {where} with non-finite parameters (an earlier update applied a NaN or Inf: check --lr "
                f"and its schedule); skipping steps cannot recover, stopped on every rank; {self._last_good()}")
        self._skipped_in_row += 1
        if self._skipped_in_row >= SKIP_LIMIT:
            raise StoppedOnEveryRank(
                f"{what} at {where}, the {SKIP_LIMIT}th non-finite step in a row (check --lr and the data); skipping "
                f"steps does not recover, stopped on every rank; {self._last_good()}")

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
        if cfg.nonfinite != "off":
            finite, grad_norm = t.adapter.last_step_finite()
            if not finite:
                self._nonfinite_step(step_loss, step_count, grad_norm)
            else:
                self._skipped_in_row = 0
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
        # A stream's (declared, found) example counts ride on the same allreduce: a wrong n stops every rank alike.
        tally = self.train.epoch_tally() if hasattr(self.train, "epoch_tally") else (0, 0)
        sums = process.allreduce_sum(np.array([loss_sum, count, *tally], dtype=np.float64))
        if sums[2] != sums[3]:
            self.train.check_tally(sums[2], sums[3])
        elapsed = time.perf_counter() - started
        run.train_time += elapsed
        if run.stopped and progress["position"] < self.train.n:
            self.commit()
            return False
        if cfg.check_divergence:
            t.agree_buffers()
            t.check_same_parameters(f"at the end of epoch {epoch + 1}")
        self.check_finite(" (end of the epoch)")  # before evaluating, keeping the best and committing
        # samples of this epoch: those trained since this (re)start plus those committed before it
        metrics = {"loss": float(sums[0] / max(sums[1], 1)), "train_samples": int(sums[1]) + resumed_at,
                   "samples_per_sec": float(sums[1]) / elapsed if elapsed else 0.0}
        if self.eval is not None:
            run.eval_metrics = t.evaluate(self.eval)
            metrics.update({f"eval_{k}": v for k, v in run.eval_metrics.items()})
        progress.update(epoch=epoch + 1, position=0, layout=[])
        stop = self.commit(evaluated=(metrics, epoch + 1))
        run.history.append(dict(metrics, epoch=epoch + 1))
        for cb in t.active_callbacks:
            cb.on_epoch_end(t, epoch, metrics)
        if stop:
            run.stopped = True
            t.log.info(stop_line(progress["best"], cfg, epoch + 1))
        return True

    def watch(self, metrics, epoch: int) -> bool:
        """The monitored metric after the evaluation of ``epoch`` (1-based): rank 0's record of it (best value,
        evaluations without improvement) broadcast into every rank's progress before the commit that carries it,
        the state offered to the best checkpoints (rank 0 writes), and the early-stopping verdict, the same on
        every rank. False when nothing watches it."""
        t, run, cfg = self.trainer, self.run_, self.trainer.config
        if not watching(cfg):
            return False
        progress = run.progress
        record = update_record(progress.get("best"), cfg, metrics, epoch)  # raises alike on every rank
        progress["best"] = record = t.process.broadcast_object(record if t.process.rank == 0 else None)
        if cfg.keep_best and t.best_store is not None:   # every rank: a sharded state is written where it lives
            path = t.offer_best(progress, record["last"], record["mode"])
            if path:
                t.log.info(f"best checkpoint {path} ({cfg.monitor} {record['last']:.6g}, epoch {epoch}; "
                           f"the {cfg.keep_best} best are kept)")
        return should_stop(record, cfg)
