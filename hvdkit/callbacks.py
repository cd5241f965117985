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

import itertools
import numbers
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


_FILE_NUMBERS = itertools.count()   # two writers of one process in one second still get a file each


class _EventFile:
    """TensorBoard's event file format (TFRecord framing of ``Event`` protos) in a plain local file."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        os.makedirs(logdir, exist_ok=True)
        while True:   # never over another writer's file (same second, host name and pid: containers)
            name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                    f"{next(_FILE_NUMBERS)}")
            try:
                self._records = RecordWriter(open(os.path.join(logdir, name), "xb"))
                break
            except FileExistsError:
                continue
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_event(self, event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


class TensorBoard(Callback):
    """Scalars to a TensorBoard event file (rank 0): TensorBoard's own protos and record format, in a plain file.

    Not through tensorboard's ``EventFileWriter`` for local directories: it opens its file with ``tf.io.gfile``,
    which imports the whole of TensorFlow wherever it is installed, 7 s of CPU (and TF's thread pools) in a torch
    job's rank 0 here. A ``gs://``-like URL still goes through it: only gfile writes there.

    Example::

        Trainer(adapter, TrainConfig(tensorboard_dir="runs/tb"))   # then: tensorboard --logdir runs/tb
    """
    FLUSH_SECONDS = 30   # step losses reach the file at least this often (tensorboard's own writer: 120 s)

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.remote = "://" in logdir   # gs://, s3://, ...: only tensorboard's gfile writer reaches those
        self.writer = None
        self.flushed = 0.0
        self.last_step = 0

    def on_train_begin(self, trainer):
        if not self.remote:   # a bad local directory stops the job before training, in one line
            from .checkpoint import ensure_writable_dir
            ensure_writable_dir(self.logdir, "tensorboard directory", "--tensorboard-dir")

    def _event(self, **fields):
        from tensorboard.compat.proto.event_pb2 import Event
        if self.writer is None:
            if self.remote:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter
                self.writer = EventFileWriter(self.logdir)
            else:
                self.writer = _EventFile(self.logdir)
            self.flushed = time.monotonic()
        self.writer.add_event(Event(wall_time=time.time(), **fields))

    def _flush(self):
        if self.writer is not None:
            self.writer.flush()
            self.flushed = time.monotonic()

    def _scalar(self, tag, value, step):
        from tensorboard.compat.proto.summary_pb2 import Summary
        self._event(step=int(step), summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]))

    def on_step_end(self, trainer, global_step, loss):
        if global_step <= self.last_step:
            # An elastic rollback redoes steps: a SessionLog START at this step makes TensorBoard drop the points
            # at and after it (the undone steps), as TF's own writers do on a restart, instead of drawing both.
            from tensorboard.compat.proto.event_pb2 import SessionLog
            self._event(step=int(global_step), session_log=SessionLog(status=SessionLog.START))
        self.last_step = global_step
        self._scalar("train/step_loss", loss, global_step)
        if time.monotonic() - self.flushed > self.FLUSH_SECONDS:
            self._flush()

    def on_epoch_end(self, trainer, epoch, metrics):
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):   # numpy floats too
                self._scalar(f"epoch/{key}", value, epoch + 1)
        self._flush()

    def on_train_end(self, trainer, result):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
