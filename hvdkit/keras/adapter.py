"""Keras 3 model + optimizer with hvdkit's ``tf.GradientTape`` step in ``tf.function``; the gradient
allreduce and the broadcast come from ``hvdkit.keras.process``.

Example::

    schedule = keras.optimizers.schedules.CosineDecay(0.05, decay_steps=500)
    adapter = KerasAdapter(model, keras.optimizers.SGD(schedule), keras.losses.SparseCategoricalCrossentropy())
    Trainer(adapter, TrainConfig(clip_grad_norm=1.0)).fit((x, y))
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import zlib
from typing import Any, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..adapter import Adapter, check_metrics
from ..errors import HvdkitError
from .feed import make_feed
from .precision import check_model_precision
from . import standin
from .process import HorovodProcess
from .sync_batchnorm import make_sync_batchnorm


class LrScaling:
    """The trainer's LR factor (world size, warmup) hooked into one Keras optimizer, once per optimizer object.

    Inside ``optimizer.apply`` (the update step and weight decay) the LR is the schedule's value times
    ``factor``; anywhere else (``optimizer.learning_rate`` read by a callback, a log line, the config) it is the
    schedule's, or the float LR's variable, unscaled: Keras callbacks that set the LR set the schedule's part.
    A ``LearningRateSchedule`` is evaluated at ``optimizer.iterations``, the optimizer steps done (committed
    with the optimizer's variables); Keras' own code would pass the micro-batch count under accumulation.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer):
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer applies through it
        self.factor = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="hvdkit_lr_factor")
        self.applying = False
        current, apply = optimizer._get_current_learning_rate, optimizer.apply

        def current_learning_rate():
            if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
                value = optimizer._learning_rate(optimizer.iterations)
            else:
                value = current()
            if not self.applying:
                return value
            value = tf.convert_to_tensor(value)
            return value * tf.cast(self.factor, value.dtype)

        def scaled_apply(grads, trainable_variables=None):
            self.applying = True  # at trace time: the traced update step multiplies by the factor variable
            try:
                return apply(grads, trainable_variables)
            finally:
                self.applying = False

        optimizer._get_current_learning_rate = current_learning_rate
        optimizer.apply = scaled_apply
        optimizer._hvdkit_lr_scaling = self

    @classmethod
    def of(cls, optimizer) -> "LrScaling":
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        return getattr(inner, "_hvdkit_lr_scaling", None) or cls(optimizer)


class UpdateGate:
    """Skips an optimizer update on every rank when the averaged gradients it would apply are not finite.

    Installed once per optimizer object (like :class:`LrScaling`): the optimizer's weight decay and update step run
    under ``tf.cond`` on the global norm of the averaged gradients, recorded by :meth:`check` (in the traced step,
    after the allreduce) in ``norm``. The averaged gradients are the same on every rank, so is the verdict. A skipped
    update leaves the variables and the optimizer's slots alone; ``iterations`` still counts it (so an LR schedule
    moves on, as the torch scheduler does), and gradient accumulators are reset as after any update.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer):
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self.norm = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="hvdkit_grad_norm")
        update, decay = optimizer._backend_update_step, optimizer._apply_weight_decay

        def when_finite(fn, *args):
            def run():
                fn(*args)
                return tf.constant(True)
            tf.cond(tf.math.is_finite(self.norm), run, lambda: tf.constant(False))

        def gated_update(grads, trainable_variables, learning_rate):
            when_finite(update, grads, trainable_variables, learning_rate)

        def gated_decay(variables):
            if optimizer.weight_decay is not None:
                when_finite(decay, variables)

        optimizer._backend_update_step = gated_update
        optimizer._apply_weight_decay = gated_decay
        optimizer._hvdkit_update_gate = self

    @classmethod
    def of(cls, optimizer) -> "UpdateGate":
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        return getattr(inner, "_hvdkit_update_gate", None) or cls(optimizer)

    def check(self, grads) -> None:
        """Record the global norm of the averaged ``grads`` (inside the step, before the optimizer applies them)."""
        self.norm.assign(tf.cast(tf.linalg.global_norm(list(grads)), tf.float32))

    def last(self) -> Tuple[bool, float]:
        norm = float(self.norm.numpy())
        return math.isfinite(norm), norm


def _flagged(batch):
    """The stand-in flag set while a micro-batch without samples runs (nothing to do for one with samples)."""
    return contextlib.nullcontext() if batch.count else standin.idle()


def poison(loss, variable):
    """0, or NaN times a zero term in ``variable`` when ``loss`` holds a NaN/Inf: added to the objective, it makes
    that variable's gradient NaN, so this rank's non-finite loss reaches every rank through the gradient allreduce
    (the averaged norm is NaN everywhere) without a collective of its own."""
    bad = tf.logical_not(tf.reduce_all(tf.math.is_finite(loss)))
    zero = tf.reduce_sum(variable * tf.zeros((), variable.dtype))
    return tf.cast(zero, loss.dtype) * tf.where(bad, tf.constant(float("nan"), loss.dtype), tf.zeros((), loss.dtype))


class AnyBatchSize:
    """A step ``tf.function(x, y, weight, training)`` traced once for every batch size.

    ``reduce_retracing`` traces a second time when a batch of another size comes (an epoch's short last batch): a
    stall of the whole graph's tracing (0.5 s on a two-layer model here, seconds on a large one) while the other
    ranks wait in the step's collectives. Before the first call with a ``training`` value this traces the step on
    the inputs' specs with the batch dimension unknown, as hvdkit's ``fit`` path (and Keras' ``fit`` on a tf.data
    input) does; every batch size then runs that one graph. (An idle micro-batch without SyncBatchNorm runs with
    ``training=False``, its own graph, traced when the first one comes, as before.)

    Example::

        step = AnyBatchSize(tf.function(lambda x, y, w, training: ..., reduce_retracing=True))
        step(x[:4], y[:4], w, True); step(x[:2], y[:2], w, True)   # one trace
    """

    def __init__(self, step):
        self.step, self._traced = step, set()

    def get_concrete_function(self, *args, **kwargs):
        return self.step.get_concrete_function(*args, **kwargs)

    def __call__(self, x, y, weight, training):
        if training not in self._traced:
            self.step.get_concrete_function(_any_batch(x), _any_batch(y), weight, training)
            self._traced.add(training)
        return self.step(x, y, weight, training)


def _any_batch(inputs):
    """The TensorSpecs of a batch (an array, a dense tensor, or a nest of them) with the batch dimension unknown;
    anything else (a ragged or sparse tensor) is left as it is, to be traced as TensorFlow would."""
    def spec(a):
        if isinstance(a, np.ndarray) and a.ndim:
            return tf.TensorSpec((None,) + a.shape[1:], tf.as_dtype(a.dtype))
        if isinstance(a, tf.Tensor) and a.shape.rank:
            return tf.TensorSpec(tf.TensorShape([None]).concatenate(a.shape[1:]), a.dtype)
        return a
    return tf.nest.map_structure(spec, inputs)


def _is_stateful(metric) -> bool:
    return isinstance(metric, keras.metrics.Metric)


def refuse_unbuilt_layers(model) -> None:
    """Refuse a model that says it is built while some of its layers are not, and would get their weights only at
    the first step: after the optimizer was built over the weights there are and broadcast, so that Keras fails
    there with "Unknown variable".

    Keras 3 leaves such layers in two cases: a Sequential after a layer it cannot run on symbolic inputs (numpy in
    a custom layer's call), and a subclassed model without a ``build`` of its own that ``model.build(shape)`` marked
    built without calling it (Keras warns). Layers that keep Keras' default ``build`` (Flatten, Dropout, ...) hold
    no weights and are not named; a model with its own ``build``, or one called once on data, is taken as built (a
    layer it never calls holds no weights).

        >>> refuse_unbuilt_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))  # built: passes
        >>> class Net(keras.Model):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.dense = keras.layers.Dense(2, name="dense")
        ...     def call(self, x):
        ...         return self.dense(x)
        >>> net = Net(); net.build((None, 3))   # Keras warns: no build() of its own
        >>> refuse_unbuilt_layers(net)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        hvdkit.errors.HvdkitError: the Keras model's layer dense is not built; call the model once on a batch, ...
    """
    def own_build(layer):   # Keras' default build creates no weights
        return type(layer).build is not keras.layers.Layer.build
    if not isinstance(model, keras.Sequential) and (own_build(model) or model._called):
        return
    unbuilt = [layer.name for layer in model._flatten_layers(include_self=False)
               if not layer.built and own_build(layer)]
    if unbuilt:
        raise HvdkitError(f"the Keras model's {'layers' if len(unbuilt) > 1 else 'layer'} {', '.join(unbuilt)} "
                          f"{'are' if len(unbuilt) > 1 else 'is'} not built; call the model once on a batch, "
                          "model(x[:1]), before training (or give a custom layer compute_output_shape, a subclassed "
                          "model a build() that builds its layers); a layer that cannot run on symbolic tensors "
                          "trains only with KerasFitAdapter on a model compiled with run_eagerly=True")


class KerasAdapter(Adapter):
    """A built Keras 3 model, a Keras optimizer and a mean-reducing ``loss_fn(y_true, y_pred)``.

    compression: "none" or "fp16" on the wire. accuracy: count argmax-correct predictions in eval.
    metrics: ``{name: fn(y_true, y_pred)}`` returning the SUM over the batch of a per-sample value (reported as
    that sum over the whole evaluation set divided by the sample count), or ``{name: keras.metrics.Metric}``
    (stateful: its state variables, which must be sums over samples as in Keras' built-in metrics, are summed over
    ranks and its ``result()`` computed from them; reported under ``name``).
    Non-finite steps (``TrainConfig.nonfinite``): see :class:`UpdateGate`; a rank's non-finite loss is folded
    into its gradients (:func:`poison`).
    Batches are ``(inputs, targets)``; the model is called as ``model(inputs, training=...)``, traced once for
    every batch size (:class:`AnyBatchSize`), so a ``call`` must take the batch size from ``keras.ops.shape(x)``,
    not from the static ``x.shape[0]`` (as under ``fit``).
    The optimizer's learning rate may be a float or a ``keras.optimizers.schedules.LearningRateSchedule``: the
    step applies ``schedule(optimizer.iterations) * factor`` (world size, warmup; see :class:`LrScaling`).
    Precision: a ``TrainConfig(precision="bf16")`` needs a model built under ``hvdkit.keras.use_precision("bf16")``
    (Keras' ``mixed_bfloat16``: bfloat16 compute in training and evaluation, float32 variables and gradients, so a
    float32 allreduce); the adapter refuses a model that computes in another precision than the config's.
    Sharded optimizer (``TrainConfig.shard_optimizer``, ZeRO stage 2, see :mod:`hvdkit.keras.zero`): gradients are
    reduce-scattered, each rank steps 1/N of the flattened trainable variables with 1/N of the optimizer state (an
    inner optimizer of the user's class), the updated variables are allgathered. The user's optimizer is not built
    (it keeps its hyperparameters, ``iterations`` and learning rate, shared with the inner one). Static checkpoints
    are sharded (each rank writes :meth:`shard_payload`, rank 0 the rest); elastic commits and best checkpoints hold
    the unsharded state under the keys an unsharded run writes, for which every rank calls :meth:`gather_state`
    before :meth:`state_to_bytes`. Any world size resumes either, sharded or not.
    """

    framework = "tensorflow"

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn,
                 compression: str = "none", accuracy: bool = True, metrics: Optional[Dict[str, Any]] = None):
        if type(optimizer).__module__.startswith("horovod"):
            raise HvdkitError("pass a plain Keras optimizer: Horovod's Keras DistributedOptimizer does not average "
                              "gradients on Keras 3; hvdkit does the allreduce itself")
        if compression not in ("none", "fp16"):
            raise HvdkitError(f"unknown compression {compression!r}; use one of none, fp16")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.compression, self.accuracy = compression, accuracy
        self._lr: Optional[LrScaling] = None
        self.clip_grad_norm: Optional[float] = None
        self.sync_batchnorm, self.accumulation = False, 1
        self.metrics = check_metrics(metrics, accuracy)
        self._gate: Optional[UpdateGate] = None
        self._sharded = None   # a hvdkit.keras.zero.ShardedOptimizer with shard_optimizer
        self._lr_written = None   # (factor variable, value) last assigned by set_lr_factor
        self._eval_step = None    # the traced evaluation forward (eval_batch), made when first needed
        self._verdict = None      # last_step_finite() of the step run last; cleared by _before_update

    def default_process(self):
        return HorovodProcess()

    def make_feed(self, data):
        return make_feed(data)

    # ---- model and optimizer -------------------------------------------------------------
    def prepare(self, lr_factor: float, accumulation: int, sync_batchnorm: bool = False,
                clip_grad_norm: Optional[float] = None, precision: str = "fp32", shard_optimizer: bool = False) -> None:
        self.sync_batchnorm, self.accumulation, self.clip_grad_norm = sync_batchnorm, accumulation, clip_grad_norm
        if sync_batchnorm:
            make_sync_batchnorm(self.model)
        if not self.model.built:
            raise HvdkitError("the Keras model is not built; call it once on a batch, model(x[:1]), or start it "
                              "with keras.Input(shape=...), before training")
        refuse_unbuilt_layers(self.model)
        check_model_precision(self.model, precision)  # the dtype policy is fixed when the layers are built
        # a sharded fit before this one: its state, gathered at its end, goes on in this fit, sharded or not
        earlier = self._sharded if self._sharded is not None and self._sharded.gathered() else None
        if shard_optimizer:
            from .zero import ShardedOptimizer   # here: zero.py builds on this module's LrScaling and UpdateGate
            kept = {"state": earlier.known_state()} if earlier is not None else {}
            self._sharded = ShardedOptimizer(
                self.optimizer, self.model.trainable_variables, self.process, compression=self.compression,
                clip_grad_norm=clip_grad_norm, check_finite=self.nonfinite != "off",
                accumulate=self._graph_accumulation(accumulation), **kept)
        else:
            self._sharded = None
            # Optimizer variables exist only once built; build now so they can be broadcast (horovod #2652).
            self.optimizer.build(self.model.trainable_variables)
            if earlier is not None:   # the unsharded arrays, in the order of optimizer.variables (as a checkpoint)
                state = earlier.full_state()
                if len(state) != len(self.optimizer.variables):
                    raise HvdkitError(f"the earlier sharded fit left {len(state)} optimizer variables, this optimizer "
                                      f"has {len(self.optimizer.variables)}; build a new adapter for this fit")
                for variable, value in zip(self.optimizer.variables, state):
                    variable.assign(value)
            self._lr = LrScaling.of(self.optimizer)
            # a later fit with the check off must not hand over (or gate on) the norm the earlier one checked
            self._gate = UpdateGate.of(self.optimizer) if self.nonfinite != "off" else None
        self._make_steps()
        self._eval_step = None   # traced again on first use: prepare() may have changed the layers (SyncBatchNorm)
        self.set_lr_factor(lr_factor)

    def _graph_accumulation(self, accumulation: int) -> int:
        """Micro-batches the sharded optimizer sums in the graph: none here (:meth:`_train_step` sums them)."""
        return 1

    def _make_steps(self) -> None:
        """(Re)make the traced steps: after a reshard they must capture the new shard variables."""
        self._grad_step = AnyBatchSize(tf.function(self._grads, reduce_retracing=True))
        self._apply_step = tf.function(self._apply, reduce_retracing=True)
        self._one_step = AnyBatchSize(tf.function(self._step, reduce_retracing=True))

    def _place_shards(self) -> None:
        """Sharded: cut this rank's shards when a load or a resize asks for it (no collective)."""
        if self._sharded is not None and self._sharded.needs_reshard() and self._sharded.reshard():
            self._make_steps()

    def _before_update(self) -> None:
        """Before a step's update: shards placed, and the gathered unsharded state dropped (it goes stale)."""
        self._verdict = None
        if self._sharded is not None:
            self._place_shards()
            self._sharded.will_step()

    def broadcast_state(self) -> None:
        if self._sharded is None:
            self.process.broadcast_variables(list(self.model.variables) + list(self.optimizer.variables))
            return
        # Rank 0's unsharded state (fresh: None; loaded, or gathered by the commit before a resize), cut into this
        # rank's shard for the world size of now.
        self.process.broadcast_variables(list(self.model.variables) + self._sharded.user_scalars())
        state = self.process.broadcast_object(self._sharded.known_state() if self.process.rank == 0 else None)
        self._sharded.load_full_state(state)
        self._place_shards()

    def set_lr_factor(self, factor: float) -> None:
        # An eager assign costs ~0.5 ms, 1.5% of a small model's step, and the factor changes only with the world
        # size and warmup: written only when it (or the variable holding it) changed. Only this method writes it.
        target = self._sharded.lr_factor if self._sharded is not None else self._lr.factor
        if self._lr_written is not None and self._lr_written[0] is target and self._lr_written[1] == factor:
            return
        target.assign(factor)
        self._lr_written = (target, float(factor))

    def clip(self, grads):
        """The averaged gradients scaled by ``min(1, clip_grad_norm / global norm)`` (all of them together)."""
        if self.clip_grad_norm is None:
            return grads
        clipped, _ = tf.clip_by_global_norm(list(grads), self.clip_grad_norm)
        return clipped

    def _grads(self, x, y, weight, training=True):
        """Data loss and gradients of ``weight * loss + regularization / accumulation`` (the weight regularizers
        join every micro-batch, an idle one too, so the averaged gradient carries them exactly once; a stand-in's
        call losses are taken out, :func:`.standin.uncounted`).
        ``training=False`` only for a stand-in without SyncBatchNorm: BatchNormalization would fold the stand-in
        row's moments into its moving statistics."""
        with tf.GradientTape() as tape:
            outputs = self.model(x, training=training)
            loss = tf.reduce_sum(self.loss_fn(y, outputs))   # a stand-in's counts for nothing: weight 0
            scaled = loss * tf.cast(weight, loss.dtype)
            if self.model.losses:  # kernel/activity regularizers, as Keras' own fit adds them
                regularization = tf.cast(tf.add_n(self.model.losses), scaled.dtype)
                dropped = standin.uncounted(self.model, scaled.dtype)
                if dropped is not None:
                    regularization -= dropped
                scaled += regularization / self.accumulation
            if self.nonfinite != "off":
                scaled += poison(loss, self._smallest_variable())
        variables = self.model.trainable_variables
        grads = tape.gradient(scaled, variables)
        # dense: micro-batch gradients are summed (IndexedSlices have no +) and must meet other ranks' zeros
        return loss, [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]

    def _apply(self, grads):
        if self._sharded is not None:   # reduce-scatter, clip, check, step the shard, allgather
            self._sharded.step(self._sharded.flatten(grads))
            return
        reduced = self.process.allreduce_gradients(list(grads), compression=self.compression)
        if self._gate is not None:
            self._gate.check(reduced)
        self.optimizer.apply(self.clip(reduced), self.model.trainable_variables)

    def _smallest_variable(self):
        """The trainable variable with the fewest elements (where :func:`poison` puts its NaN)."""
        return min(self.model.trainable_variables, key=lambda v: int(np.prod(v.shape)))

    def last_step_finite(self) -> Tuple[bool, Optional[float]]:
        # Reading the norm is an eager device read (~0.45 ms): a one-batch step hands it over with its loss
        # (_train_step); otherwise it is read here, once per step (the loop asks twice).
        if self._verdict is None:
            if self._sharded is not None:
                self._verdict = self._sharded.last_step()
            else:
                self._verdict = self._gate.last() if self._gate is not None else (True, None)
        return self._verdict

    def state_finite(self, buffers: bool = True) -> bool:
        variables = list(self.model.trainable_variables) + (self._buffers() if buffers else [])
        return all(bool(np.isfinite(v.numpy()).all()) for v in variables)

    def _checked_norm(self) -> Optional[tf.Variable]:
        """The variable the step records the averaged gradients' norm in, or None without the check."""
        if self._sharded is not None:
            return self._sharded.norm if self._sharded.check_finite else None
        return self._gate.norm if self._gate is not None else None

    def _step(self, x, y, weight, training=True):
        """One step; with the non-finite check on, ``[loss, checked norm]`` in one tensor: the host reads both in
        one transfer (a second eager read of the norm cost ~0.5 ms a step, 1.5% of the bench's CNN step)."""
        loss, grads = self._grads(x, y, weight, training)
        self._apply(grads)
        norm = self._checked_norm()
        if norm is None:
            return loss
        return tf.stack([tf.cast(loss, tf.float64), tf.cast(norm.read_value(), tf.float64)])  # float64: both exact

    def _inputs(self, batch):
        """(x, y, weight, training) for one micro-batch. One without samples runs on the feed's stand-in row with
        weight 0, flagged (:mod:`.standin`), so regularizers and SyncBatchNorm's collective still run; without
        SyncBatchNorm in inference mode (BatchNormalization's moving statistics stay, no dropout draw)."""
        weight = batch.weight if batch.count else 0.0
        return batch.inputs, batch.targets, tf.constant(weight, tf.float32), bool(batch.count) or self.sync_batchnorm

    def buffers_before_step(self):
        """Skip mode: the buffers as they are before a step (None otherwise), for :meth:`undo_skipped_step`."""
        return [v.numpy() for v in self._buffers()] if self.nonfinite == "skip" else None

    def undo_skipped_step(self, before) -> None:
        """After a step skipped as non-finite: the buffers back to ``before``. The forward pass of that step moved
        BatchNormalization's moving statistics (to NaN, from a batch holding one); the skipped step changes
        nothing."""
        if before is not None and not self.last_step_finite()[0]:
            for v, value in zip(self._buffers(), before):
                v.assign(value)

    def train_step(self, micro_batches) -> Tuple[float, int]:
        """One optimizer step over ``micro_batches`` (every rank the same number, some maybe empty)."""
        before = self.buffers_before_step()
        self._before_update()
        result = self._train_step(micro_batches)
        self.undo_skipped_step(before)
        return result

    def _train_step(self, micro_batches) -> Tuple[float, int]:
        if len(micro_batches) == 1:  # the common case: one graph call per step, as in a hand-written loop
            b = micro_batches[0]
            with _flagged(b):
                out = self._one_step(*self._inputs(b)).numpy()
            if out.ndim:   # [loss, norm]: the step's verdict comes with its loss
                norm = float(out[1])
                self._verdict = (math.isfinite(norm), norm)
            loss = float(out[0] if out.ndim else out)
            return (loss * b.count if b.count else 0.0), b.count
        total, loss_sum, count = None, 0.0, 0
        for b in micro_batches:
            with _flagged(b):
                loss, grads = self._grad_step(*self._inputs(b))
            total = list(grads) if total is None else [a + g for a, g in zip(total, grads)]
            if b.count:
                loss_sum += float(loss) * b.count
                count += b.count
        self._apply_step(total)
        return loss_sum, count

    # ---- buffers and random state ---------------------------------------------------------------
    def _buffers(self):
        """Float variables that trainable layers keep but the optimizer does not train (BatchNorm moving
        statistics); a frozen layer's weights never drift, so they are left alone."""
        found, seen = [], set()
        for layer in self.model._flatten_layers(include_self=False):
            if not layer.trainable:
                continue
            for v in layer._non_trainable_variables if hasattr(layer, "_non_trainable_variables") else []:
                if id(v) not in seen and "float" in str(v.dtype) and v.name != "seed_generator_state":
                    seen.add(id(v))
                    found.append(v)
        return found

    def _seed_states(self):
        return [v for v in self.model.variables if v.name == "seed_generator_state"]

    def sync_buffers(self) -> None:
        self.process.average_variables(self._buffers())

    def rng_state(self):
        return [v.numpy().tolist() for v in self._seed_states()]

    def set_rng_state(self, state) -> None:
        for v, value in zip(self._seed_states(), state):
            v.assign(np.asarray(value, dtype=v.dtype))

    def seed_rank(self, seed: int) -> None:
        # Each layer's SeedGenerator (Dropout, noise, augmentation layers) gets a stream of its own per rank.
        for i, v in enumerate(self._seed_states()):
            v.assign(np.asarray([(seed + 7919 * i) % (2 ** 31 - 1), 0], dtype=v.dtype))

    def metric_names(self) -> List[str]:
        summed = sorted(name for name, fn in self.metrics.items() if not _is_stateful(fn))
        return ["loss", "count"] + (["correct"] if self.accuracy else []) + summed

    def _stateful(self) -> List[Tuple[str, Any]]:
        """``(name, metric)`` of the stateful metrics, in a fixed order (the same on every rank)."""
        return sorted(((name, m) for name, m in self.metrics.items() if _is_stateful(m)), key=lambda item: item[0])

    def reset_eval_state(self) -> None:
        for _, metric in self._stateful():
            metric.reset_state()

    def _update_stateful(self, targets, outputs) -> None:
        for _, metric in self._stateful():
            metric.update_state(targets, outputs)

    def _state_variables(self) -> list:
        return [v for _, m in self._stateful() for v in m.variables]

    def _stateful_results(self) -> Dict[str, float]:
        return {name: float(np.asarray(m.result())) for name, m in self._stateful()}

    def eval_state(self):
        values = [np.asarray(v.numpy(), dtype=np.float64).ravel() for v in self._state_variables()]
        return np.concatenate(values) if values else np.zeros(0)

    def _assign_summed(self, variables, summed) -> None:
        at = 0
        for v in variables:
            size = int(np.prod(v.shape))
            value = np.asarray(summed[at:at + size]).reshape(tuple(v.shape))
            v.assign(np.rint(value).astype(v.dtype) if "int" in str(v.dtype) else value.astype(v.dtype))
            at += size
        if at != len(summed):
            raise HvdkitError(f"stateful metrics hold {at} numbers here but {len(summed)} were reduced; every rank "
                              "must build the same metrics")

    def eval_results(self, summed_state) -> Dict[str, float]:
        self._assign_summed(self._state_variables(), summed_state)
        return self._stateful_results()

    def _eval_forward(self, x, y, weight, training):
        outputs = self.model(x, training=training)
        return outputs, self.loss_fn(y, outputs)

    def eval_batch(self, inputs, targets) -> Dict[str, float]:
        # One graph call per batch, like the training step (eager, a small model's forward cost several times more
        # than its graph's); traced once for every batch size, so a short last batch does not trace it again.
        # A model compiled with run_eagerly=True may hold code that cannot be traced: it is evaluated eagerly too.
        if getattr(self.model, "run_eagerly", False):
            outputs, loss = self._eval_forward(inputs, targets, 1.0, False)
        else:
            if self._eval_step is None:
                self._eval_step = AnyBatchSize(tf.function(self._eval_forward, reduce_retracing=True))
            outputs, loss = self._eval_step(inputs, targets, 1.0, False)
        count = len(targets)
        sums = {"loss": float(loss) * count, "count": float(count)}
        if self.accuracy:
            sums["correct"] = float(np.sum(np.argmax(outputs, axis=-1) == np.asarray(targets)))
        for name, fn in self.metrics.items():
            if not _is_stateful(fn):
                sums[name] = float(fn(targets, outputs))
        self._update_stateful(targets, outputs)
        return sums

    def parameter_checksums(self, buffers: bool = True) -> List[Tuple[str, int]]:
        variables = list(self.model.trainable_variables) + (self._buffers() if buffers else [])
        return [(v.path, zlib.crc32(np.ascontiguousarray(v.numpy()).tobytes())) for v in variables]

    # ---- state -------------------------------------------------------------------------------
    def gather_state(self) -> None:
        if self._sharded is not None:
            self._sharded.gather()

    def optimizer_state_bytes(self) -> int:
        if self._sharded is not None:
            return self._sharded.state_bytes()
        return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in self.optimizer.variables))

    def _optimizer_arrays(self) -> List[np.ndarray]:
        """The optimizer's variables as numpy, unsharded (sharded: as of the last :meth:`gather_state`)."""
        if self._sharded is not None:
            return self._sharded.full_state()
        return [v.numpy() for v in self.optimizer.variables]

    def shard_payload(self):
        return self._sharded.payload() if self._sharded is not None else None

    def merge_shards(self, blob: bytes, arrays) -> bytes:
        from .zero import merge_blob
        return merge_blob(blob, arrays)

    def state_to_bytes(self, progress: Dict[str, Any], sharded: bool = False) -> bytes:
        arrays = {f"model/{i}": v.numpy() for i, v in enumerate(self.model.variables)}
        if sharded:   # the slots are in the shards
            arrays.update(self._sharded.other_state())
        else:
            arrays.update({f"optimizer/{i}": value for i, value in enumerate(self._optimizer_arrays())})
        buffer = io.BytesIO()
        np.savez(buffer, progress=np.array(json.dumps(progress)), **arrays)
        return buffer.getvalue()

    def state_from_bytes(self, blob: bytes) -> Dict[str, Any]:
        try:
            saved = np.load(io.BytesIO(blob), allow_pickle=False)
            assigned = [("model", self.model.variables)]
            if self._sharded is None:
                assigned.append(("optimizer", self.optimizer.variables))
            else:   # the same unsharded arrays, resharded by the next broadcast_state (or step) for the world of then
                count = sum(1 for k in saved.files if k.startswith("optimizer/"))
                self._sharded.load_full_state([saved[f"optimizer/{i}"] for i in range(count)])
            for prefix, variables in assigned:
                names = [k for k in saved.files if k.startswith(prefix + "/")]
                if len(names) != len(variables):
                    raise ValueError(f"{len(names)} saved {prefix} variables, this one has {len(variables)}")
                for i, v in enumerate(variables):
                    v.assign(saved[f"{prefix}/{i}"])
            return json.loads(str(saved["progress"]))
        except Exception as e:  # a file from outside: any failure to read it is the file's, reported in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise HvdkitError(f"does not fit this model or optimizer ({type(e).__name__}: {first[:200]})") from None
