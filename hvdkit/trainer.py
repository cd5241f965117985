"""The framework-free training loop: data order, steps, metrics, checkpoints, events.

The trainer never touches a tensor; everything framework-specific goes through an
:class:`hvdkit.adapter.Adapter`. Every rank runs the same loop and the same number of steps;
decisions that only rank 0 can make (can the checkpoint directory be written? which checkpoint
is valid?) are broadcast before anyone acts on them, so bad input fails on every rank alike
instead of leaving the others blocked in a collective.

Example::

    from hvdkit import Trainer, TrainConfig
    from hvdkit.torch import TorchAdapter

    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05), loss_fn)
    result = Trainer(adapter, TrainConfig(epochs=3, batch_size=64)).fit((x_train, y_train), (x_test, y_test))
    print(result.eval["accuracy"], result.samples_per_sec)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .adapter import Adapter
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


class Trainer:
    """Runs ``fit`` with one adapter and one config; see the module docstring."""

    def __init__(self, adapter: Adapter, config: Optional[TrainConfig] = None,
                 callbacks: Sequence[Callback] = ()):
        self.adapter = adapter
        self.config = config or TrainConfig()
        self.user_callbacks = list(callbacks)
        self.log = None

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

    def _save(self, store, progress):
        if store is not None and self.adapter.rank == 0:
            blob = self.adapter.state_to_bytes(progress)
            path = store.save(blob, dict(progress, world_size=self.adapter.size, framework=self.adapter.framework))
            self.log.info(f"checkpoint {path} (epoch {progress['epoch']}, position {progress['position']})")

    def _resume(self, store, n):
        def load():
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
        progress = self._agree(load)
        if progress is not None:
            self.adapter.broadcast_state()
            self.log.info(f"resumed from {progress['file']}: epoch {progress['epoch'] + 1}, sample "
                          f"{progress['position']} of {n}, step {progress['global_step']} "
                          f"(written by {progress['saved_world_size']} workers, now {self.adapter.size})")
        return progress

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

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, train, eval_data=None) -> FitResult:
        cfg = self.config.validate()
        a = self.adapter
        a.init(seed=cfg.seed, threads=cfg.threads)
        self.log = get_logger(a.rank)
        n = a.dataset_len(train)
        check_train_config(n, a.size, cfg.batch_size, cfg.accumulation)  # same verdict on every rank
        if eval_data is not None and a.dataset_len(eval_data) == 0:
            raise HvdkitError("the evaluation dataset is empty; pass a non-empty test split or none")
        store = None
        if cfg.checkpoint_dir:
            directory = self._agree(lambda: ensure_writable_dir(cfg.checkpoint_dir))
            store = CheckpointStore(directory, keep=cfg.keep_checkpoints, log=self.log.warning)

        a.prepare(lr_factor=cfg.lr_factor(a.size, 0), accumulation=cfg.accumulation)
        progress = {"epoch": 0, "position": 0, "global_step": 0, "n": n, "seed": cfg.seed}
        resumed = self._resume(store, n) if store is not None and cfg.resume else None
        if resumed:
            progress.update({k: resumed[k] for k in ("epoch", "position", "global_step")})
        callbacks = self._callbacks()
        for cb in callbacks:
            cb.on_train_begin(self)

        history, eval_metrics, trained, train_time = [], {}, 0, 0.0
        stopped = False
        checked_first = False
        global_batch = cfg.batch_size * a.size * cfg.accumulation
        epoch = progress["epoch"]
        while epoch < cfg.epochs and not stopped:
            steps = a.plan_epoch(train, epoch, progress["position"], cfg)
            for cb in callbacks:
                cb.on_epoch_begin(self, epoch, len(steps))
            epoch_samples = 0
            started = time.perf_counter()

            def before_step(step):
                a.set_lr_factor(cfg.lr_factor(a.size, progress["global_step"]))

            def after_step(step, step_loss, step_count) -> bool:
                """Bookkeeping after each optimizer step; True asks the adapter to end the epoch now."""
                nonlocal epoch_samples, checked_first, stopped
                epoch_samples += step.samples_in_step
                progress.update(position=step.end, global_step=progress["global_step"] + 1)
                if cfg.check_divergence and not checked_first:
                    self.check_same_parameters("after the first step")
                    checked_first = True
                for cb in callbacks:
                    cb.on_step_end(self, progress["global_step"], step_loss / max(step_count, 1))
                if cfg.stop_after_steps and progress["global_step"] >= cfg.stop_after_steps:
                    stopped = True
                    return True
                if cfg.checkpoint_every and progress["global_step"] % cfg.checkpoint_every == 0 and step.end < n:
                    self._save(store, progress)
                return False

            loss_sum, count = a.run_epoch(train, steps, before_step, after_step)
            sums = a.allreduce_sum(np.array([loss_sum, count], dtype=np.float64))
            train_time += time.perf_counter() - started
            trained += epoch_samples
            if stopped and progress["position"] < n:
                self._save(store, progress)
                break
            if cfg.check_divergence:
                self.check_same_parameters(f"at the end of epoch {epoch + 1}")
            metrics = {"loss": float(sums[0] / max(sums[1], 1)), "train_samples": int(sums[1])}
            if eval_data is not None:
                eval_metrics = self.evaluate(eval_data)
                metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
            epoch += 1
            progress.update(epoch=epoch, position=0)
            self._save(store, progress)
            history.append(dict(metrics, epoch=epoch))
            for cb in callbacks:
                cb.on_epoch_end(self, epoch - 1, metrics)

        result = FitResult(
            world_size=a.size, epochs_done=progress["epoch"], global_step=progress["global_step"],
            global_batch_size=global_batch,
            train_samples_per_epoch=history[-1]["train_samples"] if history else 0,
            samples_trained=trained, samples_per_sec=trained / train_time if train_time else 0.0,
            history=history, eval=eval_metrics, stopped_early=stopped, resumed_from=resumed)
        for cb in callbacks:
            cb.on_train_end(self, result)
        return result
