"""The adapter role: one framework's model and optimizer behind the framework-free trainer.

An adapter trains, evaluates, checksums and serialises its model and optimizer. It does not know
where data comes from (a :class:`hvdkit.feed.Feed` hands it micro-batches) nor how ranks talk (its
framework's :class:`hvdkit.process.Process`, attached by the trainer, does the collectives). Every
method runs on every rank in the same order, so the collectives inside line up.

Example (what :class:`hvdkit.Trainer` does with it)::

    adapter.attach(process)                                   # after process.init(...)
    adapter.prepare(lr_factor=process.size, accumulation=1)   # wrap optimizer, scale LR (clip_grad_norm=..., precision=...,
                                                              # shard_optimizer=...)
    adapter.broadcast_state()                                 # rank 0's model everywhere
    loss_sum, count = adapter.train_step(micro_batches)
    sums = adapter.eval_batch(inputs, targets)                # {"loss": .., "correct": .., "count": ..}
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .feed import Feed, MicroBatch
from .process import Process
from .sharding import Step


RESERVED_METRICS = ("loss", "count", "correct", "samples")


def check_metrics(metrics: Optional[Dict[str, Any]], accuracy: bool) -> Dict[str, Any]:
    """A user's ``metrics={name: ...}`` checked (names that evaluation does not report itself); a new dict."""
    if metrics is None:
        return {}
    from .errors import HvdkitError
    if not isinstance(metrics, dict):
        raise HvdkitError(f"metrics must be a dict of name -> function (got {type(metrics).__name__})")
    taken = RESERVED_METRICS + (("accuracy",) if accuracy else ())
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name or name in taken:
            raise HvdkitError(f"metric name {name!r} is taken or empty (evaluation reports {', '.join(taken)} "
                              "itself); choose another name")
        if not callable(fn):
            raise HvdkitError(f"metric {name} must be a function of (outputs, targets) returning a per-batch sum")
    return dict(metrics)


class Adapter(abc.ABC):
    """One framework's model and optimizer. Implementations: ``hvdkit.torch.TorchAdapter``,
    ``hvdkit.keras.KerasAdapter`` and ``hvdkit.keras.KerasFitAdapter``."""

    framework: str = "?"
    process: Process = None
    nonfinite: str = "off"   # set by the trainer (TrainConfig.nonfinite) before prepare

    # ---- wiring ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def default_process(self) -> Process:
        """The process a launched job uses: this framework's ``HorovodProcess``."""

    @abc.abstractmethod
    def make_feed(self, data: Any) -> Feed:
        """``data`` (arrays, a dataset, a tf.data source, or already a Feed) as this framework's feed."""

    def attach(self, process: Process) -> None:
        """Use ``process`` (initialised) for every collective from now on."""
        self.process = process

    # ---- model and optimizer -------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, lr_factor: float, accumulation: int, sync_batchnorm: bool = False,
                clip_grad_norm: Optional[float] = None, precision: str = "fp32", shard_optimizer: bool = False) -> None:
        """Wrap the optimizer for allreduce (reducing every ``accumulation`` backward passes), scale the LR
        by ``lr_factor``, make BatchNorm layers synchronised when asked, clip the averaged gradients to the
        global norm ``clip_grad_norm`` (None: no clipping), compute in ``precision`` ("fp32", or "bf16": forward
        and loss in bfloat16, float32 weights and gradients, so the allreduce is float32). ``shard_optimizer``:
        ZeRO stage 2 instead of the allreduce (each rank steps 1/N of the parameters with 1/N of the optimizer
        state; see :meth:`gather_state`); an adapter that cannot raises HvdkitError. No collective: the
        trainer broadcasts the state next."""

    def set_nonfinite(self, mode: str) -> None:
        """``"stop"``/``"skip"``: from now on check every optimizer step for a non-finite loss (on any rank) or a
        non-finite norm of the averaged gradients, and skip that step's update on every rank (the trainer then
        stops, or goes on); the verdict must be the same on every rank without a collective of its own — an
        adapter folds a rank's non-finite loss into the gradients it averages (a NaN in one of them), so the
        averaged norm is non-finite everywhere. ``"off"``: no check. Called before :meth:`prepare`."""
        self.nonfinite = mode

    def last_step_finite(self) -> Tuple[bool, Optional[float]]:
        """After a step with the check on: (False if its update was skipped as non-finite, the averaged
        gradient norm or None); the same on every rank."""
        return True, None

    def state_finite(self, buffers: bool = True) -> bool:
        """True when every trained parameter (and, with ``buffers``, every buffer :meth:`sync_buffers` agrees)
        is finite."""
        return True

    @abc.abstractmethod
    def set_lr_factor(self, factor: float) -> None:
        """From the next optimizer step on, apply ``factor`` times the LR of the user's schedule (or the LR the
        user gave): world-size scaling and warmup. The schedule's own LR is never overwritten, so a schedule
        keeps its state and a resize changes only the factor."""

    @abc.abstractmethod
    def broadcast_state(self) -> None:
        """Make every rank's model and optimizer equal to rank 0's."""

    @abc.abstractmethod
    def train_step(self, micro_batches: List[MicroBatch]) -> Tuple[float, int]:
        """One optimizer step over ``micro_batches``; returns (sum of sample losses, samples) on this rank."""

    def run_epoch(self, feed: Feed, steps: List[Step], before_step: Callable[[Step], None],
                  after_step: Callable[[Step, float, int], bool]) -> Tuple[float, int]:
        """Run ``steps`` (every rank the same number); ``after_step`` returning True ends the epoch early.

        Returns this rank's (sum of sample losses, samples), steps skipped as non-finite left out. Adapters whose framework owns the loop
        (Keras ``model.fit``) override this and call the two hooks from that loop.
        """
        loss_sum, count = 0.0, 0
        for step, micro_batches in feed.step_batches(steps, self.process.rank, self.process.size):
            before_step(step)
            step_loss, step_count = self.train_step(micro_batches)
            if self.nonfinite == "off" or self.last_step_finite()[0]:  # a skipped step trained nothing
                loss_sum += step_loss
                count += step_count
            if after_step(step, step_loss, step_count):
                break
        return loss_sum, count

    def min_batch_samples(self) -> int:
        """The fewest samples one backward pass may hold on a rank (torch BatchNorm cannot train on one)."""
        return 1

    def sync_buffers(self) -> None:
        """Make the model's non-trained state that drifts per rank (BatchNorm running statistics) the mean
        over ranks. The trainer calls it before every evaluation, commit and checkpoint."""

    @abc.abstractmethod
    def rng_state(self) -> Any:
        """This rank's random state of the model (dropout, augmentation) as JSON-able data."""

    @abc.abstractmethod
    def set_rng_state(self, state: Any) -> None:
        """Restore a state from :meth:`rng_state`."""

    @abc.abstractmethod
    def seed_rank(self, seed: int) -> None:
        """Start this rank's own random stream from ``seed`` (the trainer derives it from seed and rank)."""

    @abc.abstractmethod
    def metric_names(self) -> List[str]:
        """The keys :meth:`eval_batch` returns (every rank reduces the same list, even with no samples)."""

    @abc.abstractmethod
    def eval_batch(self, inputs: Any, targets: Any) -> Dict[str, float]:
        """Sums over one batch: at least ``loss`` (summed sample losses) and ``count``; the trainer reports each
        sum over the whole evaluation set divided by ``count`` (``correct`` as ``accuracy``)."""

    def reset_eval_state(self) -> None:
        """Before an evaluation: clear stateful metrics (their state then sums this rank's batches)."""

    def eval_state(self) -> Sequence[float]:
        """Stateful metrics' state after this rank's batches, as numbers that add up over ranks (the same length
        on every rank); the trainer sums it over ranks with the per-batch sums."""
        return ()

    def eval_results(self, summed_state: Sequence[float]) -> Dict[str, float]:
        """Stateful metrics' values from their state summed over ranks."""
        return {}

    @abc.abstractmethod
    def parameter_checksums(self, buffers: bool = True) -> List[Tuple[str, int]]:
        """(name, checksum of the exact bytes) for every trained parameter, and with ``buffers`` every other
        tensor that agrees across ranks after :meth:`sync_buffers`, in a fixed order (not random states)."""

    # ---- state -------------------------------------------------------------------------------
    def gather_state(self) -> None:
        """Every rank, before any :meth:`state_to_bytes` (a commit, a checkpoint, a best checkpoint): assemble
        state that lives spread over the ranks (a sharded optimizer's) so that ``state_to_bytes`` can write it
        whole on one rank. A collective when there is such state and it changed since the last call; nothing
        otherwise (the default)."""

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer state this rank holds now (its tensors; sharded: its shard's); 0 when the
        adapter does not measure it."""
        return 0

    def shard_payload(self) -> Optional[Tuple[Dict[str, np.ndarray], Dict[str, Any]]]:
        """Every rank, at a static checkpoint: ``(arrays, index)`` when the optimizer is sharded -- this rank's slice
        of each flat state vector (1-D numpy, by name) and the ``shard_index`` that rebuilds the unsharded state
        from every rank's (see :mod:`hvdkit.sharded_checkpoint`; the same on every rank) -- or None (the default:
        the checkpoint is one file from :meth:`state_to_bytes`). No collective."""
        return None

    def merge_shards(self, blob: bytes, arrays: Dict[str, np.ndarray]) -> bytes:
        """A sharded checkpoint's rank-0 blob (``state_to_bytes(sharded=True)``) and its unsharded state arrays (keyed
        as the index's ``assemble`` rows) as the ordinary blob :meth:`state_from_bytes` loads."""
        from .errors import HvdkitError
        raise HvdkitError(f"{type(self).__name__} cannot read sharded checkpoints")

    @abc.abstractmethod
    def state_to_bytes(self, progress: Dict[str, Any], sharded: bool = False) -> bytes:
        """Model, optimizer (with its LR schedule's state) and ``progress`` as one blob (rank 0 calls this alone in a
        static job, every rank in an elastic commit; always after :meth:`gather_state` on every rank). With
        ``sharded`` (a sharded checkpoint, no gather before it): without the per-element optimizer state that
        :meth:`shard_payload` writes."""

    @abc.abstractmethod
    def state_from_bytes(self, blob: bytes) -> Dict[str, Any]:
        """Load a blob from :meth:`state_to_bytes` into model and optimizer; return its progress."""
