"""PyTorch model and optimizer behind the trainer; the collectives come from ``hvdkit.torch.process``.

Example::

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=500)
    adapter = TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy, compression="fp16",
                           scheduler=scheduler, scheduler_interval="step")
    Trainer(adapter, TrainConfig(epochs=2, clip_grad_norm=1.0)).fit((x, y))
"""
from __future__ import annotations

import base64
import contextlib
import io
import math
import warnings
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..adapter import Adapter, check_metrics
from ..errors import HvdkitError
from .buckets import DEFAULT_BUCKET_BYTES, GradientBuckets
from .feed import TorchFeed
from .process import HorovodProcess
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .zero import ShardedOptimizer, check_shardable, merge_blob, tensor_bytes

COMPRESSIONS = ("none", "fp16")
OPS = ("average", "adasum")
REDUCERS = ("horovod", "buckets")
SCHEDULER_INTERVALS = ("step", "epoch")


def _point_at(scheduler, optimizer) -> None:
    """Make ``scheduler`` (and those it chains: SequentialLR, ChainedScheduler) set ``optimizer``'s LRs."""
    scheduler.optimizer = optimizer
    for inner in getattr(scheduler, "_schedulers", ()):
        _point_at(inner, optimizer)


def grad_norm(parameters) -> torch.Tensor:
    """The L2 norm of all gradients together (sparse ones by their coalesced values); 0 without gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # one fused kernel per dtype for the dense ones (a norm per tensor was ~9% of the kit's per-step Python)
    dense = [g for g in grads if not g.is_sparse]
    norms = list(torch._foreach_norm(dense)) if dense else []
    norms += [torch.linalg.vector_norm(g.coalesce().values()) for g in grads if g.is_sparse]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale every gradient by ``min(1, max_norm / (total_norm + 1e-6))`` in place, ``total_norm`` the L2 norm of
    all of them together; returns ``total_norm``. As ``torch.nn.utils.clip_grad_norm_``, which refuses the sparse
    gradients of an ``Embedding(sparse=True)``: those count by their (coalesced) values here."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = grad_norm(parameters)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


class TorchAdapter(Adapter):
    """A torch model, its optimizer and a mean-reducing ``loss_fn(outputs, targets)``.

    compression: "none" or "fp16" (gradients cast to fp16 on the wire).
    op: "average" or "adasum" (Horovod's reduction of gradients).
    reducer: how the gradients are averaged. "horovod" (the default): ``hvd.DistributedOptimizer``, an allreduce
        per parameter launched from its gradient hook. "buckets": one grouped allreduce per bucket of about
        ``bucket_bytes`` of gradients, launched in reverse order as backward fills each bucket, DDP's scheme
        (``hvdkit.torch.buckets``). The numbers are the same; neither was faster here (README "Benchmarks and tuned
        defaults"). Adasum and sparse gradients (``Embedding(sparse=True)``) always use Horovod's.
    accuracy: also count argmax-correct predictions in evaluation (classification).
    scheduler: a ``torch.optim.lr_scheduler`` scheduler built on ``optimizer`` (any but ReduceLROnPlateau, which
        needs a metric). The adapter steps it (do not): after every optimizer step (``scheduler_interval="step"``)
        or after the last step of every epoch (``"epoch"``). Its state is broadcast, committed and checkpointed
        with the optimizer's, so a resume, a rollback or a resize continues the schedule.
    metrics: ``{name: fn(outputs, targets)}``, each returning the SUM over the batch of a per-sample value (a
        tensor or a number), e.g. top-3 hits ``(outputs.topk(3, 1).indices == targets[:, None]).any(1).sum()``;
        evaluation reports ``name`` as that sum over the whole evaluation set (every rank's share, reduced like
        the loss) divided by the sample count.
    Batches are ``(inputs, targets)``; the model is called as ``model(inputs)``.

    Non-finite steps (``TrainConfig.nonfinite``, "stop" by default): a rank whose loss is NaN/Inf puts a NaN into
    its gradients, so after the allreduce the averaged gradient norm is non-finite on every rank alike; then
    ``optimizer.step()`` (and the optimizer's state) is skipped on every rank. The LR scheduler still steps.

    Precision (``TrainConfig.precision``): "bf16" runs the forward pass and the loss, in training and in
    evaluation, under ``torch.autocast("cpu", dtype=torch.bfloat16)``; the parameters, their gradients (so
    Horovod's allreduce), the optimizer and the backward pass's accumulation stay float32. Evaluation runs in
    bf16 too: the model is scored as it trains (and as a Keras ``mixed_bfloat16`` model always is).

    LR: between steps each param group's ``lr`` is the schedule's (the scheduler's, or the one you gave);
    during a step (forward, backward, ``optimizer.step()``) it is that times the trainer's factor (world size,
    warmup), and restored after. So the scheduler never sees the factor and the trainer never overwrites it.

    Sharded optimizer (``TrainConfig.shard_optimizer``, ZeRO stage 2, see ``hvdkit.torch.zero``): no Horovod
    wrapper; gradients accumulate locally, are reduce-scattered so each rank steps its 1/N of the flattened
    parameters with its 1/N of the optimizer state, and the updated parameters are allgathered. ``optimizer``
    stays the user's (schedulers set its LRs; it holds no state). Static checkpoints are sharded (each rank writes
    :meth:`shard_payload`, rank 0 ``state_to_bytes(sharded=True)``; :meth:`merge_shards` reads them back); elastic
    commits and best checkpoints hold the unsharded state, for which every rank calls :meth:`gather_state` before
    :meth:`state_to_bytes`. Any world size resumes either, sharded or not. After a step ``.grad`` is None.
    """

    framework = "torch"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Any, Any], torch.Tensor], compression: str = "none",
                 op: str = "average", accuracy: bool = True, scheduler: Any = None,
                 scheduler_interval: str = "step", metrics: Optional[Dict[str, Callable[[Any, Any], Any]]] = None,
                 reducer: str = "horovod", bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if compression not in COMPRESSIONS:
            raise HvdkitError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
        if op not in OPS:
            raise HvdkitError(f"unknown reduction op {op!r}; use one of {', '.join(OPS)}")
        if reducer not in REDUCERS:
            raise HvdkitError(f"unknown reducer {reducer!r}; use one of {', '.join(REDUCERS)}")
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise HvdkitError(f"unknown scheduler_interval {scheduler_interval!r}; "
                              f"use one of {', '.join(SCHEDULER_INTERVALS)}")
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise HvdkitError("ReduceLROnPlateau steps on a validation metric, which the trainer does not pass; "
                                  "use a scheduler that steps on its own (StepLR, CosineAnnealingLR, LambdaLR, ...)")
            if not all(callable(getattr(scheduler, m, None)) for m in ("step", "state_dict", "load_state_dict")):
                raise HvdkitError(f"scheduler must be a torch.optim.lr_scheduler scheduler (got {type(scheduler).__name__})")
            if getattr(scheduler, "optimizer", None) is not optimizer:
                raise HvdkitError("the scheduler must be built on the optimizer passed to TorchAdapter")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.compression, self.op, self.accuracy, self.reducer = compression, op, accuracy, reducer
        self.bucket_bytes = int(bucket_bytes)
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.clip_grad_norm: Optional[float] = None
        self.precision = "fp32"
        self._lr_factor = 1.0
        self.metrics = check_metrics(metrics, accuracy)
        self._step_finite, self._grad_norm = True, None
        self._sharded: Optional[ShardedOptimizer] = None
        self._buckets: Optional[GradientBuckets] = None   # reducer="buckets", once prepared at > 1 rank
        # Horovod's DistributedOptimizer, once a fit wrapped the optimizer in it: its gradient hooks stay on the
        # parameters for good (Horovod keeps no handle to remove them), so a later fit steps the same wrapper
        self._horovod_optimizer, self._wrapped_user = None, None

    def default_process(self):
        return HorovodProcess()

    def make_feed(self, data):
        return TorchFeed.of(data)

    # ---- model and optimizer -------------------------------------------------------------
    def prepare(self, lr_factor: float, accumulation: int, sync_batchnorm: bool = False,
                clip_grad_norm: Optional[float] = None, precision: str = "fp32", shard_optimizer: bool = False) -> None:
        if precision not in ("fp32", "bf16"):
            raise HvdkitError(f"unknown precision {precision!r}; use fp32 or bf16")
        low = next((name for name, p in self.model.named_parameters() if p.dtype == torch.bfloat16), None)
        if low is not None:  # Horovod's MPI and Gloo ops cannot reduce bfloat16 gradients
            raise HvdkitError(f"parameter {low} is bfloat16; keep the model in float32 (the master weights) and "
                              "pass precision='bf16' (--precision bf16) to compute in bfloat16")
        self.precision = precision
        if self.nonfinite == "skip" and self.op == "adasum":
            raise HvdkitError("nonfinite='skip' needs op='average': Adasum applies the ranks' combined update during "
                              "the step, so a non-finite one cannot be skipped; use --nonfinite stop")
        if clip_grad_norm is not None and self.op == "adasum":
            raise HvdkitError("clip_grad_norm needs op='average': Adasum combines the ranks' parameter updates, "
                              "so there is no averaged gradient to clip")
        if self._horovod_optimizer is not None and (shard_optimizer or self._buckets_wanted()):
            raise HvdkitError("this TorchAdapter's earlier fit averaged gradients with Horovod's DistributedOptimizer, "
                              "whose hooks stay on the parameters; build a new TorchAdapter (and optimizer) for a fit "
                              "with " + ("shard_optimizer" if shard_optimizer else "reducer='buckets'"))
        if shard_optimizer:
            check_shardable(self.optimizer, self.model, self.op)
        if sync_batchnorm:
            convert_sync_batchnorm(self.model)
        self.clip_grad_norm = clip_grad_norm
        if self._buckets is not None:   # prepared again (a second fit): one set of hooks
            self._buckets.remove()
            self._buckets = None
        # a sharded fit before this one: its state, gathered at its end, goes on in this fit, sharded or not
        kept = self._sharded.full_state_dict() if self._sharded is not None and self._sharded.gathered() else None
        if shard_optimizer:
            # no Horovod wrapper (no per-parameter allreduce hooks): the sharded step reduce-scatters
            self._sharded = ShardedOptimizer(self.optimizer, self.process, compression=self.compression, state=kept)
        else:
            self._sharded = None
            if self._buckets_wanted():
                self._buckets = self.process.gradient_buckets(self._held_in_model_order(), compression=self.compression,
                                                              bucket_bytes=self.bucket_bytes)
            if self._horovod_optimizer is not None:   # a second fit: the same wrapper, this fit's accumulation
                self._reuse_horovod_optimizer(accumulation)
            elif self._buckets is None:
                user = self.optimizer
                self.optimizer = self.process.distributed_optimizer(
                    user, self.model.named_parameters(), compression=self.compression,
                    accumulation=accumulation, op=self.op)
                if self.optimizer is not user:
                    self._horovod_optimizer, self._wrapped_user = self.optimizer, user
            if kept is not None:   # into the optimizer that steps (Horovod's wrapper starts with an empty state)
                self.optimizer.load_state_dict(kept)
        # Horovod's optimizer is a new object, sharing the param-group dicts only until a state dict is loaded
        # into it (broadcast, resume): the scheduler must set the LRs of the optimizer that steps.
        if self.scheduler is not None:
            _point_at(self.scheduler, self.optimizer)
        self.set_lr_factor(lr_factor)

    def _reuse_horovod_optimizer(self, accumulation: int) -> None:
        """A later fit steps the wrapper of the first, whose hooks and parameter list Horovod fixed when it wrapped:
        refused in one line if the parameters it would average changed since (a layer unfrozen for fine-tuning would
        step on each rank's own gradient, and the ranks would drift apart without a word)."""
        wrapper = self._horovod_optimizer
        held = [id(p) for group in wrapper.param_groups for p in group["params"]]
        trainable = {id(p) for group in wrapper.param_groups for p in group["params"] if p.requires_grad}
        hooked = {id(p) for p in wrapper._requires_update}   # empty where Horovod registered no hooks (one rank)
        if (self.optimizer is not wrapper or (wrapper._grad_accs and trainable != hooked)
                or held != [id(p) for group in self._wrapped_user.param_groups for p in group["params"]]):
            raise HvdkitError("the parameters this TorchAdapter's optimizer steps, or which of them require grad, "
                              "changed since its first fit, whose Horovod DistributedOptimizer averages a fixed set; "
                              "build a new TorchAdapter (and optimizer) for this fit")
        if any(handle is not None for handle, _ in wrapper._handles.values()):
            # an earlier fit raised between backward and the step: allreduces in flight (and, under Adasum,
            # parameters holding a partial update) that no later step may mix with its own
            raise HvdkitError("this TorchAdapter's earlier fit stopped between the backward pass and the optimizer "
                              "step; build a new TorchAdapter (and optimizer), from your last checkpoint, for this fit")
        wrapper._handles.clear()   # (entries without a handle: an accumulation's passes before its last)
        wrapper.set_backward_passes_per_step(accumulation)

    def _buckets_wanted(self) -> bool:
        """Does this adapter average with :class:`GradientBuckets` (reducer="buckets"; not Adasum, not sparse)?"""
        return self.reducer == "buckets" and self.op == "average" and not self._sparse_held()

    def _held_in_model_order(self) -> List[torch.Tensor]:
        """The parameters the optimizer steps, in the model's order (param groups may be ordered otherwise, e.g.
        decayed first): reversed, that is about the order backward produces their gradients."""
        held = {id(p): p for group in self.optimizer.param_groups for p in group["params"]}
        ordered = [p for p in self.model.parameters() if held.pop(id(p), None) is not None]
        return ordered + list(held.values())

    def _sparse_held(self) -> bool:
        """Does the optimizer step the weight of an ``Embedding(sparse=True)`` (a sparse gradient)?"""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        return any(isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse and id(m.weight) in held
                   for m in self.model.modules())

    def broadcast_state(self) -> None:
        self.process.broadcast_parameters(self.model.state_dict())
        # Not hvd.broadcast_optimizer_state: on a fresh optimizer it takes a dummy step, which applies
        # weight decay to the parameters and advances Adam's step count. Rank 0's state dict as an object
        # carries the hyperparameters and any state exactly.
        # The LR scheduler's state travels with it (a worker that joins continues the schedule).
        # Sharded: rank 0's unsharded state (loaded, or gathered by the commit before a resize), cut into this
        # rank's shard for the world size of now.
        rank = self.process.rank
        state = self.process.broadcast_object(
            {"optimizer": self._optimizer_state_dict(),
             "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None} if rank == 0 else None)
        if self._sharded is not None:
            self._sharded.load_full_state_dict(state["optimizer"])
            self._sharded.reshard()
        elif rank != 0:
            self.optimizer.load_state_dict(state["optimizer"])
        if rank != 0 and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def set_lr_factor(self, factor: float) -> None:
        self._lr_factor = float(factor)   # applied during each step only: see train_step

    def train_step(self, micro_batches) -> Tuple[float, int]:
        # The schedule's LR times the factor for the whole step (Adasum steps the inner optimizer during the
        # backward pass), then the schedule's LR again: the scheduler and the state dicts never see the factor.
        groups = self.optimizer.param_groups
        scheduled = [group["lr"] for group in groups]
        for group, lr in zip(groups, scheduled):
            group["lr"] = lr * self._lr_factor
        try:
            loss_sum, count = self._step(micro_batches)
        finally:
            for group, lr in zip(groups, scheduled):
                group["lr"] = lr
        if self.scheduler is not None and self.scheduler_interval == "step":
            self._step_scheduler()
        return loss_sum, count

    def run_epoch(self, feed, steps, before_step, after_step):
        if self.scheduler is None or self.scheduler_interval != "epoch":
            return super().run_epoch(feed, steps, before_step, after_step)

        def after_epoch_step(step, step_loss, step_count):
            if step.end >= feed.n:  # the epoch's last step (however the epoch was split): before its commit
                self._step_scheduler()
            return after_step(step, step_loss, step_count)
        return super().run_epoch(feed, steps, before_step, after_epoch_step)

    def _step_scheduler(self) -> None:
        with warnings.catch_warnings():
            # torch's call-order check watches the user's optimizer object, not Horovod's wrapper that steps;
            # the order is right here (optimizer step, then scheduler step)
            warnings.filterwarnings("ignore", r"(?s).*(optimizer\.step\(\)` has been overridden|"
                                              r"Detected call of `lr_scheduler\.step\(\)` before)", UserWarning)
            self.scheduler.step()

    def _autocast(self):
        """The forward pass's precision: bfloat16 autocast for "bf16" (float32 parameters and gradients)."""
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _step(self, micro_batches) -> Tuple[float, int]:
        if not self.model.training:   # after an evaluation; a walk over every module costs ~0.2 ms per step
            self.model.train()
        self.optimizer.zero_grad()
        # skip mode: a skipped step must leave the buffers too (BatchNorm's running statistics would keep the NaN
        # of the batch that made it skip, and every evaluation after it would be NaN)
        before = [b.detach().clone() for b in self.model.buffers()] if self.nonfinite == "skip" else None
        loss_sum, count = self._forward_backward_update(micro_batches)
        if before is not None and not self._step_finite:
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), before):
                    buffer.copy_(saved)
        return loss_sum, count

    def _forward_backward_update(self, micro_batches) -> Tuple[float, int]:
        try:
            return self._reduced_update(micro_batches)
        except BaseException:
            # a step that raised (a lost peer, a bad batch): nothing of it stays pending, and its armed hooks must
            # not launch from a later backward pass (another adapter's)
            if self._buckets is not None:
                self._buckets.reset()
            raise

    def _reduced_update(self, micro_batches) -> Tuple[float, int]:
        loss_sum, count = 0.0, 0
        buckets = self._buckets
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            if buckets is not None and i == last:
                buckets.arm()   # this backward pass ends the step: each bucket goes out as it fills
            if batch.count:
                with self._autocast():
                    loss = self.loss_fn(self.model(batch.inputs), batch.targets)
                value = float(loss.detach())
                objective = loss * batch.weight
                if self.nonfinite != "off" and not math.isfinite(value):
                    objective = objective + self._poison()
                objective.backward()
                loss_sum += value * batch.count
                count += batch.count
            else:
                self._zero_gradient(batch.inputs)
        self._step_finite, self._grad_norm = True, None
        if buckets is not None:
            buckets.synchronize()   # every gradient is now the average over ranks
        if self._sharded is not None:
            self._step_finite, self._grad_norm = self._sharded.step(self.clip_grad_norm,
                                                                    check_finite=self.nonfinite != "off")
        elif self.op == "adasum":
            self.optimizer.step()
            if self.nonfinite != "off":  # Adasum updated already: a NaN in any rank's update is in every model
                self._step_finite = self.state_finite(buffers=False)
        elif self.clip_grad_norm is None and self.nonfinite == "off":
            self.optimizer.step()
        else:
            self._checked_step()
        return loss_sum, count

    def _poison(self) -> torch.Tensor:
        """A term whose gradient is NaN in one parameter (value 0·NaN): this rank's non-finite loss reaches every
        rank through the gradient allreduce, with no collective of its own."""
        # A parameter the optimizer steps: its NaN gradient reaches the checked norm (a frozen parameter's
        # gradient, or one of a parameter the optimizer does not hold, never would). Not a sparse embedding's
        # weight: a dense term would turn this rank's gradient dense while the others' stay sparse, and the ranks
        # would then run different collectives (a hang). A model whose every stepped parameter is a sparse
        # embedding's is poisoned through a lookup of row 0, which keeps the gradient sparse.
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad}
        sparse = {id(m.weight): m for m in self.model.modules()
                  if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse}
        dense = next((p for group in self.optimizer.param_groups for p in group["params"]
                      if id(p) in held and id(p) not in sparse), None)
        if dense is not None:
            return (dense.sum() * 0.0) * float("nan")
        module = next(m for key, m in sparse.items() if key in held)
        row = torch.zeros((1, 1) if isinstance(module, torch.nn.EmbeddingBag) else (1,), dtype=torch.long,
                          device=module.weight.device)
        return (module(row).sum() * 0.0) * float("nan")

    def _checked_step(self) -> None:
        """The averaged gradients (identical on every rank, so is everything decided here): their norm, checked
        for NaN/Inf (skip the update if so), clipped, then the step."""
        optimizer = self.optimizer
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        synchronize = getattr(optimizer, "synchronize", None)
        if synchronize is not None:
            synchronize()  # wait for the allreduce: the gradients are now the average over ranks
        # (one rank without Horovod: the gradients are the average already)
        if self.clip_grad_norm is not None:
            norm = clip_grad_norm_(parameters, self.clip_grad_norm)
        else:
            norm = grad_norm(parameters)
        self._grad_norm = float(norm)
        if self.nonfinite != "off" and not math.isfinite(self._grad_norm):
            self._step_finite = False  # no update, no optimizer state change, on every rank
            return
        if synchronize is None:
            optimizer.step()
        else:
            with optimizer.skip_synchronize():
                optimizer.step()

    def last_step_finite(self) -> Tuple[bool, Optional[float]]:
        return self._step_finite, self._grad_norm

    def state_finite(self, buffers: bool = True) -> bool:
        tensors = [p for p in self.model.parameters()]
        if buffers:
            tensors += [b for b in self.model.buffers() if b.is_floating_point()]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())

    def _zero_gradient(self, empty_inputs) -> None:
        """No samples here in this (last, short) step: a zero gradient still joins the allreduce. The model runs
        on the empty batch, so SyncBatchNorm's collective runs on every rank and sparse gradients stay sparse
        (an Embedding(sparse=True)'s zeros must meet the others' sparse tensors in the same collective)."""
        needs_forward = any(isinstance(m, SyncBatchNorm) for m in self.model.modules())
        if empty_inputs is not None:
            try:
                with self._autocast():
                    outputs = self.model(empty_inputs)
            except Exception as e:  # some layers refuse zero rows; only SyncBatchNorm needs the forward pass
                if needs_forward:
                    raise HvdkitError(f"the model cannot run on an empty batch ({type(e).__name__}: {e}), which "
                                      "SyncBatchNorm needs on a rank without samples in the last step; choose a "
                                      "batch size or worker count that leaves every rank a sample") from None
                outputs = None
            leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if torch.is_tensor(t)]
            if leaves:
                (sum(t.sum() for t in leaves) * 0).backward()
                return
        sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad).backward()

    def min_batch_samples(self) -> int:
        # torch's BatchNorm raises on a 1-sample batch in training mode; SyncBatchNorm counts every rank's
        # samples, except at one rank, where it is plain BatchNorm
        alone = self.process is None or self.process.size == 1
        plain_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (alone or not isinstance(m, SyncBatchNorm))
                       for m in self.model.modules())
        return 2 if plain_bn else 1

    def sync_buffers(self) -> None:
        self.process.average_tensors([b for b in self.model.buffers() if b.is_floating_point()])

    def rng_state(self) -> str:
        return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()

    def set_rng_state(self, state: str) -> None:
        torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()))

    def seed_rank(self, seed: int) -> None:
        torch.manual_seed(seed)

    def metric_names(self) -> List[str]:
        return ["loss", "count"] + (["correct"] if self.accuracy else []) + sorted(self.metrics)

    @torch.no_grad()
    def eval_batch(self, inputs, targets) -> Dict[str, float]:
        self.model.eval()
        with self._autocast():
            outputs = self.model(inputs)
            loss = self.loss_fn(outputs, targets)
        sums = {"loss": float(loss) * len(targets), "count": float(len(targets))}
        if self.accuracy:
            sums["correct"] = float((outputs.argmax(dim=1) == targets).sum())
        for name, fn in self.metrics.items():
            sums[name] = float(fn(outputs, targets))
        return sums

    def parameter_checksums(self, buffers: bool = True) -> List[Tuple[str, int]]:
        tensors = list(self.model.named_parameters()) + (list(self.model.named_buffers()) if buffers else [])
        return [(name, zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes())) for name, t in tensors]

    # ---- state -------------------------------------------------------------------------------
    def _optimizer_state_dict(self) -> Dict[str, Any]:
        """The optimizer's state dict, unsharded (sharded: as of the last :meth:`gather_state`)."""
        return self._sharded.full_state_dict() if self._sharded is not None else self.optimizer.state_dict()

    def gather_state(self) -> None:
        if self._sharded is not None:
            self._sharded.gather()

    def optimizer_state_bytes(self) -> int:
        return self._sharded.state_bytes() if self._sharded is not None else tensor_bytes(self.optimizer.state)

    def shard_payload(self):
        return self._sharded.payload() if self._sharded is not None else None

    def merge_shards(self, blob: bytes, arrays) -> bytes:
        return merge_blob(blob, arrays)

    def state_to_bytes(self, progress: Dict[str, Any], sharded: bool = False) -> bytes:
        buffer = io.BytesIO()
        optimizer = self._sharded.scalar_state_dict() if sharded else self._optimizer_state_dict()
        torch.save({"model": self.model.state_dict(), "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                    "progress": dict(progress), "torch_rng": torch.get_rng_state()}, buffer)
        return buffer.getvalue()

    def state_from_bytes(self, blob: bytes) -> Dict[str, Any]:
        try:
            saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            scheduler_state = saved.get("scheduler")
            if (scheduler_state is None) != (self.scheduler is None):
                raise ValueError("written with an LR scheduler; pass the same scheduler" if self.scheduler is None
                                 else "written without an LR scheduler; its schedule position is unknown")
            self.model.load_state_dict(saved["model"])
            if self._sharded is not None:   # resharded by the next broadcast_state (or step), for the world of then
                self._sharded.load_full_state_dict(saved["optimizer"])
            else:
                self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(scheduler_state)
            torch.set_rng_state(saved["torch_rng"])
            return dict(saved["progress"])
        except Exception as e:  # a file from outside: any failure to read it is the file's, reported in one line
            first = " ".join(str(e).split())   # one line: torch's "Error(s) in loading state_dict" names keys below
            first = first if len(first) <= 160 else first[:157] + "..."
            raise HvdkitError(f"does not fit this model or optimizer ({type(e).__name__}: {first[:200]})") from None
