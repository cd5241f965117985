"""Keras 3 ``model.fit`` on Horovod: the compiled model trains with its own loop, gradients averaged.

Keras owns the batch loop here; hvdkit feeds it this rank's micro-batches (from the shared shard
plan, with the per-rank loss weights as sample weights) and averages the gradients of every
update over ranks inside the optimizer (see ``KerasFitAdapter._wrap_optimizer``): the one place
hvdkit reaches under Keras' public API.

Example::

    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy())
    Trainer(KerasFitAdapter(model), TrainConfig(epochs=5)).fit((x, y), (x_test, y_test))
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np

from ..errors import HvdkitError
from ..sharding import Step
from . import standin
from .adapter import KerasAdapter, poison
from .sync_batchnorm import make_empty_safe_batchnorm
from .feed import with_ids as with_ids_of


class _StepHooks(keras.callbacks.Callback):
    """Calls the trainer's per-step hooks from inside ``model.fit`` (k micro-batches = one step)."""

    def __init__(self, steps: List[Step], accumulation: int, before_step, after_step, adapter=None):
        super().__init__()
        self.steps, self.k = steps, accumulation
        self.before_step, self.after_step = before_step, after_step
        self.adapter = adapter
        self.loss_sum, self.count = 0.0, 0
        self.base_sum, self.seen = 0.0, 0  # good steps' loss before Keras' running mean restarted; samples since
        self.done, self.stopped = 0, False
        self.buffers = None  # skip mode: the buffers before the step (KerasAdapter.buffers_before_step)
        self.idle, self.metric_state = False, []   # this batch a stand-in; then Keras' metric variables before it

    def on_train_batch_begin(self, batch, logs=None):
        self.idle = not len(self.steps[batch // self.k].micro_batches[batch % self.k])
        if self.idle:   # the stand-in row (standin): flagged, and Keras' metrics (its running loss mean, the
            # compiled metrics, some of which take no sample weight) put back as they were before it
            self.metric_state = [(v, v.numpy()) for metric in self.model.metrics for v in metric.variables]
            standin.flag().assign(True)
        if batch % self.k == 0:
            self.before_step(self.steps[batch // self.k])
            if self.adapter is not None:
                self.buffers = self.adapter.buffers_before_step()
                self.adapter._before_update()

    def on_train_batch_end(self, batch, logs=None):
        if self.idle:
            standin.flag().assign(False)
            for v, value in self.metric_state:
                v.assign(value)
            if logs is not None:   # this hook's running loss below and the callbacks after it: without the row
                logs.update({k: float(v) for k, v in self.model.get_metrics_result().items()
                             if k in logs and np.ndim(v) == 0})
        if (batch + 1) % self.k:
            return
        step = self.steps[batch // self.k]
        here = sum(len(ids) for ids in step.micro_batches)
        running = float(logs["loss"])  # Keras reports the epoch's running mean
        self.seen += here
        if self.adapter is None or self.adapter.nonfinite == "off" or self.adapter.last_step_finite()[0]:
            self.count += here
            self.loss_sum = self.base_sum + running * self.seen
        else:  # a skipped step: its (maybe non-finite) loss leaves the running mean, which restarts after it
            self.adapter.undo_skipped_step(self.buffers)
            self.model._loss_tracker.reset_state()
            self.base_sum, self.seen = self.loss_sum, 0
        self.done += 1
        if self.after_step(step, running * here, here):
            self.model.stop_training = self.stopped = True


class KerasFitAdapter(KerasAdapter):
    """A compiled Keras 3 model trained by ``model.fit``; same guarantees as :class:`KerasAdapter`.

    keras_callbacks: extra Keras callbacks for ``fit`` (they run on every rank).
    metrics: as :class:`KerasAdapter`'s. Compiled metrics (``model.compile(metrics=[...])``) are reported too,
        under their Keras names, computed over each rank's exact evaluation share (no padding, no duplicates) from
        their state variables summed over ranks — exact for metrics whose state is sums over samples, as Keras'
        built-in ones (Mean-based, accuracies, top-k, Precision/Recall/AUC, confusion-matrix ones); a compiled
        "accuracy" replaces the built-in argmax one. (The values Keras' ``fit`` logs per rank during training are
        not reported.)
    Sharded optimizer (``shard_optimizer``): as :class:`KerasAdapter`'s; ``fit``'s update
    (``optimizer.apply_gradients``) goes to the sharded step instead (see :meth:`_wrap_optimizer`), and with
    ``accumulation`` > 1 the micro-batch gradients are summed in a local flat vector (as Keras' own accumulation
    does per variable) before one reduce-scatter per step.
    """

    def __init__(self, model: keras.Model, compression: str = "none", accuracy: bool = True,
                 keras_callbacks: Sequence[keras.callbacks.Callback] = (), metrics: Optional[Dict[str, Any]] = None):
        if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
            raise HvdkitError("compile the Keras model first: model.compile(optimizer=..., loss=...)")
        if int(getattr(model, "steps_per_execution", 1) or 1) != 1:
            # Keras then calls the batch hooks once per N batches: N-1 of every N updates would run unchecked
            raise HvdkitError(f"model.compile(steps_per_execution={model.steps_per_execution}) runs several steps "
                              "per batch hook, which the kit's per-step checks and bookkeeping need; compile with "
                              "steps_per_execution=1 (the default)")
        loss = keras.losses.get(model.loss) if isinstance(model.loss, str) else model.loss
        super().__init__(model, model.optimizer, loss, compression=compression, accuracy=accuracy, metrics=metrics)
        self.keras_callbacks = list(keras_callbacks)
        self.accumulation = 1

    def prepare(self, lr_factor: float, accumulation: int, sync_batchnorm: bool = False,
                clip_grad_norm=None, precision: str = "fp32", shard_optimizer: bool = False) -> None:
        steps = int(getattr(self.optimizer, "gradient_accumulation_steps", None) or 1)
        if not shard_optimizer and steps != accumulation:
            # Keras applies every steps-th update, whatever this fit asks; it fixes that when the optimizer is built
            if self.optimizer.built:
                raise HvdkitError(f"gradient accumulation {accumulation} on a Keras optimizer built (by an earlier "
                                  f"fit, or before this one) for {steps}; compile the model with a new optimizer "
                                  f"and make a new adapter for this fit, or keep accumulation={steps}")
            if steps > 1:   # set on the optimizer by its user
                raise HvdkitError(f"the optimizer's gradient_accumulation_steps={steps} differs from accumulation="
                                  f"{accumulation}; leave it unset and pass accumulation={steps} to TrainConfig")
        if accumulation > 1 and not shard_optimizer:   # sharded: the sharded step accumulates
            # Keras accumulates k micro-batch gradients and applies their mean every k-th call.
            self.optimizer.gradient_accumulation_steps = accumulation
        super().prepare(lr_factor, accumulation, sync_batchnorm, clip_grad_norm, precision, shard_optimizer)
        make_empty_safe_batchnorm(self.model)  # an idle micro-batch's stand-in must not enter moving statistics
        # Horovod's TF ops have no XLA kernels, and Keras' jit_compile="auto" would compile train_step.
        self.model.jit_compile = False
        self.model.train_function = None
        self._wrap_optimizer()

    def _graph_accumulation(self, accumulation: int) -> int:
        return accumulation   # Keras calls the optimizer once per micro-batch

    def _before_update(self) -> None:
        # inside model.fit: its traced step holds the shard variables, placed by _fit before it started
        self._verdict = None
        if self._sharded is not None:
            if self._sharded.needs_reshard():
                raise HvdkitError("internal error: the sharded optimizer's shards changed during model.fit; "
                                  "please report it")
            self._sharded.will_step()

    def _make_steps(self) -> None:
        super()._make_steps()
        self.model.train_function = None   # fit traces its step again, with the shard variables of now

    def _wrap_optimizer(self) -> None:
        """Average the gradients over ranks where Keras is about to use them for an update.

        Keras 3 has no public hook between computing and applying gradients in ``fit``. Its optimizer passes
        the gradients of an update — with accumulation, the mean of the k accumulated ones, on the k-th call
        only — through ``_clip_gradients`` right before the update step: one allreduce per optimizer step,
        and clipping (``clip_grad_norm``, then the optimizer's own clipnorm/clipvalue) sees averaged gradients.
        (Horovod 0.28.1's own DistributedOptimizer silently skips the allreduce on Keras 3.)

        Sharded: ``fit``'s ``optimizer.apply_gradients`` calls ``optimizer.apply``, which hands the local gradients
        to the sharded step (the user's optimizer, never built, applies nothing itself).
        """
        optimizer, adapter = self.optimizer, self
        if getattr(optimizer, "_hvdkit_allreduce", False):  # a second fit() with the same optimizer
            return
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):  # applies through its inner optimizer
            raise HvdkitError("loss scaling (LossScaleOptimizer, mixed_float16) is not supported: its updates bypass "
                              "the gradient allreduce; use bf16 (--precision bf16), which needs no loss scaling")
        if not callable(getattr(optimizer, "_clip_gradients", None)):
            raise HvdkitError(f"this Keras {keras.__version__} optimizer has no _clip_gradients step to average "
                              "gradients in; use the KerasAdapter (GradientTape loop) instead of model.fit")
        original, scale, apply = optimizer._clip_gradients, optimizer.scale_loss, optimizer.apply
        model = self.model

        def counted_loss(loss):
            dropped = standin.uncounted(model, loss.dtype)   # a stand-in's call losses (its data loss has weight 0)
            return loss if dropped is None else loss - dropped

        def clip_gradients(grads):
            reduced = adapter.process.allreduce_gradients(list(grads), compression=adapter.compression)
            if adapter._gate is not None:  # nonfinite check: the update below runs only if this norm is finite
                adapter._gate.check(reduced)
            return original(adapter.clip(reduced))

        def scale_loss(loss):
            # Keras' train_step passes the loss through here inside the gradient tape: a rank's non-finite loss
            # becomes a NaN gradient, so the averaged norm is NaN on every rank (no collective of its own);
            # a stand-in row's loss is its weight regularization alone (its data loss has weight 0 already)
            loss = counted_loss(loss)
            scaled = scale(loss)
            if adapter.nonfinite != "off":
                scaled = scaled + keras.ops.cast(poison(loss, adapter._smallest_variable()), scaled.dtype)
            return scaled

        def sharded_or_plain_apply(grads, trainable_variables=None):
            sharded = adapter._sharded
            if sharded is None:
                return apply(grads, trainable_variables)
            if trainable_variables is None or [id(v) for v in trainable_variables] != [id(v) for v in sharded.variables]:
                raise HvdkitError("model.fit applied gradients to other variables than the model's trainable "
                                  "variables at prepare time, which the sharded optimizer holds; do not change "
                                  "which layers are trainable between compile and fit")
            sharded.accumulate_or_step(grads)

        optimizer._clip_gradients = clip_gradients
        optimizer.scale_loss = scale_loss
        optimizer.apply = sharded_or_plain_apply
        optimizer._hvdkit_allreduce = True

    def run_epoch(self, feed, steps, before_step, after_step) -> Tuple[float, int]:
        rank, size = self.process.rank, self.process.size
        dataset, ids = feed.fit_input(steps, rank, size, self.accumulation)
        if ids is not None:  # Keras' loop hides the batches: the ids come from a second pass over the input
            hook = before_step

            def before_step(step):
                hook(with_ids_of(step, next(ids), feed.n))
        return self._fit(dataset, steps, len(steps) * self.accumulation, before_step, after_step)

    def _fit(self, dataset, steps, batches, before_step, after_step) -> Tuple[float, int]:
        if self._sharded is not None:   # fit's traced step captures the shards: placed before it starts
            self._place_shards()
            self._sharded.reset_accumulation()
        hooks = _StepHooks(steps, self.accumulation, before_step, after_step, adapter=self)
        try:
            self.model.fit(dataset, epochs=1, steps_per_epoch=batches, verbose=0, shuffle=False,
                           callbacks=[hooks, *self.keras_callbacks])
        finally:   # a step that failed on a stand-in (a lost peer, a stop) must not leave the next fit flagged
            standin.flag().assign(False)
        if hooks.done != len(steps) and not hooks.stopped:  # Keras only warns when the input runs out
            raise HvdkitError(f"the input ran out after {hooks.done} of {len(steps)} steps (for tf.data: pass the "
                              "pipeline's true example count as n)")
        return hooks.loss_sum, hooks.count

    # ---- compiled metrics ------------------------------------------------------------------------
    def _compiled(self):
        """Keras' compiled metrics (``model.compile(metrics=...)``), or None."""
        return getattr(self.model, "_compile_metrics", None)

    def reset_eval_state(self) -> None:
        super().reset_eval_state()
        if self._compiled() is not None:
            self._compiled().reset_state()

    def _update_stateful(self, targets, outputs) -> None:
        super()._update_stateful(targets, outputs)
        if self._compiled() is not None:
            self._compiled().update_state(targets, outputs)

    def _state_variables(self) -> list:
        compiled = self._compiled()
        if compiled is not None and not compiled.built:  # fit() builds them; evaluation only follows training
            raise HvdkitError("the compiled metrics were never built (no training step ran on this worker)")
        return super()._state_variables() + (list(compiled.variables) if compiled is not None else [])

    def _stateful_results(self) -> Dict[str, float]:
        results = super()._stateful_results()
        if self._compiled() is not None:
            results.update({name: float(np.asarray(value)) for name, value in self._compiled().result().items()})
        return results
