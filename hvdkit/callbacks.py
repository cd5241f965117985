"""Training events and the built-in rank-0-only side effects (progress bar, log lines, TensorBoard).

A callback sees the trainer; the trainer only calls callbacks whose ``all_ranks`` is False on
rank 0, so side effects happen once per job, not once per worker.

Example::

    class PrintLoss(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            print(epoch, metrics["loss"])

    Trainer(adapter, cfg, callbacks=[PrintLoss()])
"""
from __future__ import annotations

import os
import socket
import time
from typing import Dict


class Callback:
    """No-op hooks; override the ones you need. Set ``all_ranks = True`` to run on every rank."""
    all_ranks = False

    def on_train_begin(self, trainer) -> None: ...
    def on_epoch_begin(self, trainer, epoch: int, steps: int) -> None: ...
    def on_step_end(self, trainer, global_step: int, loss: float) -> None: ...
    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, float]) -> None: ...
    def on_train_end(self, trainer, result) -> None: ...


class ProgressBar(Callback):
    """A tqdm bar per epoch (rank 0)."""

    def on_epoch_begin(self, trainer, epoch, steps):
        from tqdm import tqdm
        self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{trainer.config.epochs}", unit="step",
                        leave=False, dynamic_ncols=True)

    def on_step_end(self, trainer, global_step, loss):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def on_epoch_end(self, trainer, epoch, metrics):
        self.bar.close()


class LogLines(Callback):
    """One log line per epoch (and every ``every`` steps when asked) on rank 0."""

    def __init__(self, every: int = 0):
        self.every = every

    def on_step_end(self, trainer, global_step, loss):
        if self.every and global_step % self.every == 0:
            trainer.log.info(f"step {global_step} loss {loss:.4f}")

    def on_epoch_end(self, trainer, epoch, metrics):
        shown = " ".join(f"{k} {v:.0f}" if k.endswith("per_sec") else f"{k} {v:.4f}" if isinstance(v, float)
                         else f"{k} {v}" for k, v in metrics.items())
        trainer.log.info(f"epoch {epoch + 1}/{trainer.config.epochs}: {shown}")


class TensorBoard(Callback):
    """Scalars to a TensorBoard event file (rank 0): TensorBoard's own protos and record format, in a plain file.

    Not through tensorboard's ``EventFileWriter``: it opens its file with ``tf.io.gfile``, which imports the whole of
    TensorFlow wherever it is installed, 7 s of CPU (and TF's thread pools) in a torch job's rank 0 here.

    Example::

        Trainer(adapter, TrainConfig(tensorboard_dir="runs/tb"))   # then: tensorboard --logdir runs/tb
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.writer = None

    def _event(self, **fields):
        from tensorboard.compat.proto.event_pb2 import Event
        if self.writer is None:
            from tensorboard.summary.writer.record_writer import RecordWriter
            os.makedirs(self.logdir, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
            self.writer = RecordWriter(open(os.path.join(self.logdir, name), "wb"))
            self.writer.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self.writer.write(Event(wall_time=time.time(), **fields).SerializeToString())

    def _scalar(self, tag, value, step):
        from tensorboard.compat.proto.summary_pb2 import Summary
        self._event(step=int(step), summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]))

    def on_step_end(self, trainer, global_step, loss):
        self._scalar("train/step_loss", loss, global_step)

    def on_epoch_end(self, trainer, epoch, metrics):
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._scalar(f"epoch/{key}", value, epoch + 1)
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, trainer, result):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
