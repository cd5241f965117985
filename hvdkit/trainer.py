"""The framework-free training loop: data order, steps, metrics, checkpoints, elastic commits, events.

The trainer never touches a tensor; everything framework-specific goes through an
:class:`hvdkit.adapter.Adapter`. Every rank runs the same loop and the same number of steps;
decisions that only rank 0 can make (can the checkpoint directory be written? which checkpoint
is valid?) are broadcast before anyone acts on them, so bad input fails on every rank alike
instead of leaving the others blocked in a collective.

Started by ``horovodrun`` in elastic mode (``HOROVOD_ELASTIC=1``), the same loop runs inside
Horovod's elastic retry loop: state is committed every ``commit_every`` steps; a lost worker
rolls everyone back to the last commit, a resize re-splits the rest of the epoch over the new
workers (positions are counted in samples), and the LR follows the new world size.

Example::

    from hvdkit import Trainer, TrainConfig
    from hvdkit.torch import TorchAdapter

    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05), loss_fn)
    result = Trainer(adapter, TrainConfig(epochs=3, batch_size=64)).fit((x_train, y_train), (x_test, y_test))
    print(result.eval["accuracy"], result.samples_per_sec)
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .adapter import Adapter
from .audit import AuditLog
from .callbacks import Callback, LogLines, ProgressBar, TensorBoard
from .checkpoint import CheckpointStore, ensure_writable_dir
from .config import TrainConfig
from .errors import HvdkitError
from .log import get_logger
from .sharding import check_train_config


@dataclasses.dataclass
class FitResult:
    """What a run did, the same on every rank (metrics are already reduced over ranks)."""
    world_size: int
    epochs_done: int
    global_step: int
    global_batch_size: int
    train_samples_per_epoch: int
    samples_trained: int
    samples_per_sec: float
    history: List[Dict[str, float]]
    eval: Dict[str, float]
    stopped_early: bool
    resumed_from: Optional[Dict[str, Any]]
    resets: int = 0


@dataclasses.dataclass
class _Run:
    """Bookkeeping of one ``fit`` call (not part of the committed state)."""
    progress: Dict[str, Any]
    history: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    eval_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    trained: int = 0
    train_time: float = 0.0
    stopped: bool = False
    checked_first: bool = False
    resets: int = 0
    hosts: Optional[List[str]] = None


class Trainer:
    """Runs ``fit`` with one adapter and one config; see the module docstring."""

    def __init__(self, adapter: Adapter, config: Optional[TrainConfig] = None,
                 callbacks: Sequence[Callback] = ()):
        self.adapter = adapter
        self.config = config or TrainConfig()
        self.user_callbacks = list(callbacks)
        self.log = None
        self.elastic = False
        self._active_callbacks: List[Callback] = []

    # ---- helpers -------------------------------------------------------------------------------
    def _agree(self, compute):
        """Run ``compute`` on rank 0 and give every rank its result; an HvdkitError fails every rank."""
        outcome = None
        if self.adapter.rank == 0:
            try:
                outcome = ("ok", compute())
            except HvdkitError as e:
                outcome = ("error", str(e))
        kind, value = self.adapter.broadcast_object(outcome)
        if kind == "error":
            raise HvdkitError(value)
        return value

    def check_same_parameters(self, when: str) -> None:
        """Fail loudly, on every rank, naming the rank and the tensor, if any rank's parameters differ."""
        everyone = self.adapter.allgather_object(self.adapter.parameter_checksums())
        reference = dict(everyone[0])
        for rank, sums in enumerate(everyone[1:], start=1):
            bad = [name for name, value in sums if reference.get(name) != value]
            if bad or len(sums) != len(reference):
                raise HvdkitError(
                    f"ranks diverged {when}: rank {rank} differs from rank 0 in {bad[0] if bad else 'the parameter list'}"
                    f"{f' (and {len(bad) - 1} more tensors)' if len(bad) > 1 else ''}; gradients are not being "
                    "averaged (is a Horovod Keras helper or a second optimizer in use?)")

    def _callbacks(self) -> List[Callback]:
        cfg, chosen = self.config, []
        if self.adapter.rank == 0:
            if cfg.progress_bar:
                chosen.append(ProgressBar())
            chosen.append(LogLines(cfg.log_every))
            if cfg.tensorboard_dir:
                chosen.append(TensorBoard(cfg.tensorboard_dir))
        return chosen + [c for c in self.user_callbacks if c.all_ranks or self.adapter.rank == 0]

    def save_checkpoint(self, store: Optional[CheckpointStore], progress: Dict[str, Any], blob: bytes = None) -> None:
        """Rank 0 writes one durable checkpoint of the current state (``blob`` if already serialised)."""
        if store is not None and self.adapter.rank == 0:
            blob = blob if blob is not None else self.adapter.state_to_bytes(progress)
            path = store.save(blob, dict(progress, world_size=self.adapter.size, framework=self.adapter.framework))
            self.log.info(f"checkpoint {path} (epoch {progress['epoch']}, position {progress['position']})")

    def _load_latest(self, store: CheckpointStore, n: int) -> Optional[Dict[str, Any]]:
        """Load the newest valid checkpoint into the adapter; its progress, or None when there is none."""
        found = store.load_latest()
        if found is None:
            return None
        blob, manifest = found
        progress = self.adapter.state_from_bytes(blob)
        if progress.get("n") != n or progress.get("seed") != self.config.seed:
            raise HvdkitError(
                f"checkpoint {manifest['file']} in {store.directory} was written for {progress.get('n')} samples "
                f"and seed {progress.get('seed')}, not {n} and {self.config.seed}; use another --checkpoint-dir")
        return dict(progress, file=manifest["file"], saved_world_size=manifest.get("world_size"))

    def _announce_resume(self, progress: Dict[str, Any], n: int) -> None:
        self.log.info(f"resumed from {progress['file']}: epoch {progress['epoch'] + 1}, sample "
                      f"{progress['position']} of {n}, step {progress['global_step']} "
                      f"(written by {progress['saved_world_size']} workers, now {self.adapter.size})")

    def evaluate(self, data) -> Dict[str, float]:
        """Exact metrics over ``data``: each sample counted once, sums reduced over ranks."""
        a, cfg = self.adapter, self.config
        totals = a.eval_sums(data, cfg.eval_batch_size or cfg.batch_size)
        keys = sorted(totals)
        reduced = dict(zip(keys, a.allreduce_sum(np.array([totals[k] for k in keys], dtype=np.float64))))
        count = reduced.pop("count")
        metrics = {k.replace("correct", "accuracy"): v / max(count, 1) for k, v in reduced.items()}
        metrics["samples"] = int(count)
        return metrics

    # ---- fit -----------------------------------------------------------------------------------
    def fit(self, train, eval_data=None) -> FitResult:
        cfg = self.config.validate()
        a = self.adapter
        a.init(seed=cfg.seed, threads=cfg.threads)
        self.log = get_logger(a.rank)
        n = a.dataset_len(train)
        check_train_config(n, a.size, cfg.batch_size, cfg.accumulation)  # same verdict on every rank
        if eval_data is not None and a.dataset_len(eval_data) == 0:
            raise HvdkitError("the evaluation dataset is empty; pass a non-empty test split or none")
        elastic = self.elastic = cfg.elastic if cfg.elastic is not None else os.environ.get("HOROVOD_ELASTIC") == "1"
        audit = AuditLog(cfg.audit_dir) if cfg.audit_dir else None
        a.record_ids = audit is not None
        a.prepare(lr_factor=cfg.lr_factor(a.size, 0), accumulation=cfg.accumulation)
        run = _Run(progress={"epoch": 0, "position": 0, "global_step": 0, "n": n, "seed": cfg.seed, "layout": []})
        self._active_callbacks = self._callbacks()
        for cb in self._active_callbacks:
            cb.on_train_begin(self)
        store, resumed = None, None
        if elastic:
            # No collective may run outside Horovod's elastic loop: a worker joining later runs this code
            # while the others wait in a sync. So every rank checks the directory itself, and rank 0's
            # checkpoint reaches the others through the first sync.
            if cfg.checkpoint_dir:
                store = CheckpointStore(ensure_writable_dir(cfg.checkpoint_dir), keep=cfg.keep_checkpoints,
                                        log=self.log.warning)
                if cfg.resume:
                    resumed = self._load_latest(store, n)
                    if resumed and a.rank == 0:
                        self._announce_resume(resumed, n)
            if resumed:
                run.progress.update(self._resumed_progress(resumed))
            from .elastic import TrainerState
            state = TrainerState(self, run.progress, store, audit, durable_every=cfg.durable_every)
            a.elastic_run(lambda st: self._elastic_body(st, run, train, eval_data))(state)
            if run.progress["epoch"] < cfg.epochs and not run.stopped:  # never report a cut-short run as done
                raise HvdkitError(f"elastic training ended early at epoch {run.progress['epoch'] + 1}, step "
                                  f"{run.progress['global_step']}; see the workers' errors above")
        else:
            if cfg.checkpoint_dir:
                directory = self._agree(lambda: ensure_writable_dir(cfg.checkpoint_dir))
                store = CheckpointStore(directory, keep=cfg.keep_checkpoints, log=self.log.warning)
                if cfg.resume:
                    resumed = self._agree(lambda: self._load_latest(store, n))
            if resumed:
                run.progress.update(self._resumed_progress(resumed))
                self._announce_resume(resumed, n)
            a.broadcast_state()
            if audit:
                audit.start(run.progress["global_step"], a.rank, a.size)

            def commit():
                self.save_checkpoint(store, run.progress)
            self._loop(run, train, eval_data, commit, audit)

        result = FitResult(
            world_size=a.size, epochs_done=run.progress["epoch"], global_step=run.progress["global_step"],
            global_batch_size=cfg.batch_size * a.size * cfg.accumulation,
            train_samples_per_epoch=run.history[-1]["train_samples"] if run.history else 0,
            samples_trained=run.trained, samples_per_sec=run.trained / run.train_time if run.train_time else 0.0,
            history=run.history, eval=run.eval_metrics, stopped_early=run.stopped, resumed_from=resumed,
            resets=run.resets)
        for cb in self._active_callbacks:
            cb.on_train_end(self, result)
        return result

    def _elastic_body(self, state, run: _Run, train, eval_data):
        """One (re)start inside Horovod's elastic loop, right after the state sync."""
        a = self.adapter
        self.log = get_logger(a.rank)
        hosts = a.allgather_object(f"{os.environ.get('HOROVOD_HOSTNAME', 'localhost')}/{a.local_rank}")
        if run.hosts is not None:
            run.resets += 1
            joined, left = sorted(set(hosts) - set(run.hosts)), sorted(set(run.hosts) - set(hosts))
            self.log.info(f"workers {len(run.hosts)} -> {len(hosts)} (joined: {', '.join(joined) or '-'}; "
                          f"left: {', '.join(left) or '-'}); {'rolled back to' if state.restored else 'continuing from'} "
                          f"the commit at epoch {run.progress['epoch'] + 1}, sample {run.progress['position']}, "
                          f"step {run.progress['global_step']}; LR x{self.config.lr_factor(a.size, run.progress['global_step']):g}")
        run.hosts, state.restored, run.checked_first = hosts, False, False
        if state.audit:
            state.audit.start(run.progress["global_step"], a.rank, a.size)
        self._loop(run, train, eval_data, state.commit, state.audit)

    @staticmethod
    def _resumed_progress(resumed: Dict[str, Any]) -> Dict[str, Any]:
        """Where a checkpoint left off. One written before layouts were recorded began its epoch, at best
        knowledge, on the world that wrote it."""
        layout = resumed.get("layout") or ([[int(resumed["saved_world_size"]), 0]]
                                           if resumed.get("saved_world_size") else [])
        return dict({k: resumed[k] for k in ("epoch", "position", "global_step")}, layout=layout)

    def _layout(self, layout: Optional[List[List[int]]], position: int) -> List[List[int]]:
        """``[world_size, start]`` per stretch of the current epoch, ending with this world (always a new
        list, never the one a commit holds). A stream re-splits its remainder with it on a resize."""
        size = self.adapter.size
        if position == 0 or not layout:
            return [[size, 0]]
        if layout[-1][0] == size:
            return [list(seg) for seg in layout]
        if layout[-1][1] == position and len(layout) > 1:  # that stretch trained nothing: replace it
            return [list(seg) for seg in layout[:-1]] + [[size, position]]
        return [list(seg) for seg in layout] + [[size, position]]

    def _loop(self, run: _Run, train, eval_data, commit: Callable[[], None], audit: Optional[AuditLog]) -> None:
        """Epochs from ``run.progress`` on; ``commit`` is called every ``commit_every`` steps and per epoch."""
        a, cfg, progress = self.adapter, self.config, run.progress
        n = a.dataset_len(train)
        callbacks = self._active_callbacks
        every = cfg.commit_every if self.elastic else cfg.checkpoint_every
        while progress["epoch"] < cfg.epochs and not run.stopped:
            epoch, resumed_at = progress["epoch"], progress["position"]
            progress["layout"] = self._layout(progress.get("layout"), resumed_at)
            steps = a.plan_epoch(train, epoch, resumed_at, cfg, progress["layout"])
            for cb in callbacks:
                cb.on_epoch_begin(self, epoch, len(steps))
            started = time.perf_counter()

            def before_step(step):
                a.set_lr_factor(cfg.lr_factor(a.size, progress["global_step"]))
                if audit:  # before the step: a rank killed mid-step has recorded it; a rollback marker drops it
                    audit.record(epoch, progress["global_step"] + 1, a.rank, a.size, np.concatenate(step.micro_batches))

            def after_step(step, step_loss, step_count) -> bool:
                """Bookkeeping after each optimizer step; True asks the adapter to end the epoch now."""
                run.trained += step.samples_in_step
                progress.update(position=step.end, global_step=progress["global_step"] + 1)
                if cfg.check_divergence and not run.checked_first:
                    self.check_same_parameters("after the first step")
                    run.checked_first = True
                for cb in callbacks:
                    cb.on_step_end(self, progress["global_step"], step_loss / max(step_count, 1))
                if cfg.stop_after_steps and progress["global_step"] >= cfg.stop_after_steps:
                    run.stopped = True
                    return True
                if every and progress["global_step"] % every == 0 and step.end < n:
                    commit()
                return False

            loss_sum, count = a.run_epoch(train, steps, before_step, after_step)
            sums = a.allreduce_sum(np.array([loss_sum, count], dtype=np.float64))
            elapsed = time.perf_counter() - started
            run.train_time += elapsed
            if run.stopped and progress["position"] < n:
                commit()
                break
            if cfg.check_divergence:
                self.check_same_parameters(f"at the end of epoch {epoch + 1}")
            # samples of this epoch: those trained since this (re)start plus those committed before it
            metrics = {"loss": float(sums[0] / max(sums[1], 1)), "train_samples": int(sums[1]) + resumed_at,
                       "samples_per_sec": float(sums[1]) / elapsed if elapsed else 0.0}
            if eval_data is not None:
                run.eval_metrics = self.evaluate(eval_data)
                metrics.update({f"eval_{k}": v for k, v in run.eval_metrics.items()})
            progress.update(epoch=epoch + 1, position=0, layout=[])
            commit()
            run.history.append(dict(metrics, epoch=epoch + 1))
            for cb in callbacks:
                cb.on_epoch_end(self, epoch, metrics)
