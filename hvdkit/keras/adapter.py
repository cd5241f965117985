"""Keras 3 model + optimizer on Horovod TF collectives, with a ``tf.GradientTape`` step in ``tf.function``.

Example::

    adapter = KerasAdapter(model, keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy())
"""
from __future__ import annotations

import dataclasses
import io
import json
import zlib
from typing import Any, Dict, List, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..adapter import Adapter, HorovodProcess
from ..errors import HvdkitError
from ..sharding import Step, stream_plan, stream_segments
from ..tuning import apply_defaults
from .data import TFSource, one_thread_options


def tf_variables(variables) -> List[tf.Variable]:
    """The tf.Variables under Keras 3 variables: Horovod's TF collectives need those (no ``.ref`` on Keras')."""
    return [v.value for v in variables]


class KerasAdapter(HorovodProcess, Adapter):
    """A built Keras 3 model, a Keras optimizer and a mean-reducing ``loss_fn(y_true, y_pred)``.

    compression: "none" or "fp16" on the wire. accuracy: count argmax-correct predictions in eval.
    Batches are ``(inputs, targets)``; the model is called as ``model(inputs, training=...)``.
    """

    framework = "tensorflow"

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn,
                 compression: str = "none", accuracy: bool = True):
        if type(optimizer).__module__.startswith("horovod"):
            raise HvdkitError("pass a plain Keras optimizer: Horovod's Keras DistributedOptimizer does not average "
                              "gradients on Keras 3; hvdkit does the allreduce itself")
        if compression not in ("none", "fp16"):
            raise HvdkitError(f"unknown compression {compression!r}; use one of none, fp16")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.compression, self.accuracy = compression, accuracy
        self.hvd = None
        self._base_lr = None

    # ---- process and collectives ---------------------------------------------------------
    def init(self, seed: int, threads: int) -> None:
        import horovod.tensorflow as hvd
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TF already started its thread pools; keep them
            pass
        apply_defaults()  # hvdkit's measured Horovod settings, unless the user set them
        hvd.init()
        self.hvd = hvd
        keras.utils.set_random_seed(seed)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return self.hvd.allreduce(tf.constant(np.asarray(values, dtype=np.float64)), op=self.hvd.Sum,
                                  name="hvdkit.metrics").numpy()

    # ---- model and optimizer -------------------------------------------------------------
    def prepare(self, lr_factor: float, accumulation: int) -> None:
        if not self.model.built:
            raise HvdkitError("the Keras model is not built; start it with keras.Input(shape=...) or call "
                              "model.build(input_shape) before training")
        if not isinstance(self.optimizer.learning_rate, keras.Variable):
            raise HvdkitError("the optimizer's learning rate is a schedule; hvdkit scales and warms up the LR "
                              "itself, so pass a float learning rate")
        # Optimizer variables exist only once built; build now so they can be broadcast (horovod #2652).
        self.optimizer.build(self.model.trainable_variables)
        self._base_lr = float(self.optimizer.learning_rate.numpy())
        self._grad_step = tf.function(self._grads, reduce_retracing=True)
        self._apply_step = tf.function(self._apply, reduce_retracing=True)
        self._one_step = tf.function(self._step, reduce_retracing=True)
        self.set_lr_factor(lr_factor)

    def broadcast_state(self) -> None:
        self.hvd.broadcast_variables(tf_variables(self.model.variables) + tf_variables(self.optimizer.variables),
                                     root_rank=0)

    def elastic_run(self, fn):
        # Not horovod.tensorflow.elastic.run: it returns None on any TF error whose message lacks
        # "HorovodAllreduce" (a failed "HorovodGroupedAllreduce" ended training silently, seen here).
        from horovod.common.elastic import run_fn
        from horovod.common.exceptions import HorovodInternalError
        hvd = self.hvd

        def body(state):
            try:
                return fn(state)
            except tf.errors.OpError as e:
                if "Horovod" in (e.message or ""):
                    raise HorovodInternalError(e) from e
                raise

        def reset():
            hvd.shutdown()
            hvd.init()
        return run_fn(body, reset)

    def set_lr_factor(self, factor: float) -> None:
        self.optimizer.learning_rate.assign(self._base_lr * factor)

    def _arrays(self, data) -> Tuple[np.ndarray, ...]:
        return self._cached(data, self._as_arrays)

    @staticmethod
    def _as_arrays(data) -> Tuple[np.ndarray, ...]:
        if not (isinstance(data, (tuple, list)) and data and all(hasattr(d, "shape") for d in data)):
            raise HvdkitError(f"cannot use a {type(data).__name__} as a dataset here; pass (features, labels) "
                              "numpy arrays (for tf.data use hvdkit.keras.data)")
        if len({len(d) for d in data}) != 1:
            raise HvdkitError("the arrays of one dataset have different lengths; features and labels must match")
        return tuple(np.asarray(d) for d in data)

    def dataset_len(self, data) -> int:
        return data.n if isinstance(data, TFSource) else len(self._arrays(data)[0])

    def plan_epoch(self, data, epoch, start, config, layout=None) -> List[Step]:
        if not isinstance(data, TFSource):
            return super().plan_epoch(data, epoch, start, config, layout)
        if config.accumulation != 1:
            raise HvdkitError("gradient accumulation is not supported with tf.data inputs yet; use "
                              "accumulation=1 or pass numpy arrays")
        layout = layout or [[self.size, 0]]
        if layout[-1][0] != self.size:
            raise HvdkitError(f"the stream layout {layout} ends with {layout[-1][0]} workers, not {self.size}")
        segments = stream_segments(data.sizes(layout[0][0]), layout, config.batch_size)
        self._stream_epoch = (epoch, config.seed, config.batch_size, segments)
        return stream_plan(segments[-1].sizes, self.rank, config.batch_size, start, offset=segments[-1].start)

    def _stream_batches(self, data: TFSource, steps: List[Step]) -> tf.data.Dataset:
        """(x, y, weight, ids) per step of ``steps``: this rank's share in batches, then empty steps.

        An empty step is fed one real example with weight 0 (and no id), so the rank still joins the allreduce.
        """
        epoch, seed, batch_size, segments = self._stream_epoch
        last = segments[-1]
        full = stream_plan(last.sizes, self.rank, batch_size, offset=last.start)
        already = sum(1 for s in full[:len(full) - len(steps)] if len(s.micro_batches[0]))
        weights = [s.weights[0] for s in steps if len(s.micro_batches[0])]
        real = data.segment_dataset(self.rank, seed, epoch, segments).batch(batch_size).skip(already)
        ds = tf.data.Dataset.zip((real, tf.data.Dataset.from_tensor_slices(tf.constant(weights, tf.float32))))
        ds = ds.map(lambda batch, w: (batch[1][0], batch[1][1], w, batch[0]))
        if len(steps) > len(weights):
            filler = data.rank_dataset(0, 1).take(1).batch(1)
            filler = filler.map(lambda x, y: (x, y, tf.constant(0.0), tf.zeros([0], tf.int64)))
            ds = ds.concatenate(filler.repeat(len(steps) - len(weights)))
        return ds.with_options(one_thread_options())

    @staticmethod
    def _with_ids(step: Step, ids, n: int) -> Step:
        """``step`` naming the sample ids it trains; fails if the stream disagrees with the plan (wrong n)."""
        ids = np.asarray(ids)
        if len(ids) != len(step.micro_batches[0]):
            raise HvdkitError(f"the tf.data input gave {len(ids)} examples where the plan for n={n} expects "
                              f"{len(step.micro_batches[0])}; pass the pipeline's true example count as n")
        return dataclasses.replace(step, micro_batches=[ids])

    def run_epoch(self, data, steps, before_step, after_step) -> Tuple[float, int]:
        if not isinstance(data, TFSource):
            return super().run_epoch(data, steps, before_step, after_step)
        loss_sum, count = 0.0, 0
        batches = 0
        for step, (x, y, weight, ids) in zip(steps, self._stream_batches(data, steps)):
            batches += 1
            step = self._with_ids(step, ids, data.n)
            before_step(step)
            here = len(ids)
            step_loss, step_count = self._train_on([(x, y, weight, here)] if here else [])
            loss_sum += step_loss
            count += step_count
            if after_step(step, step_loss, step_count):
                return loss_sum, count
        if batches != len(steps):
            raise HvdkitError(f"the tf.data input ran out after {batches} of {len(steps)} steps; pass the "
                              f"pipeline's true example count as n (got n={data.n})")
        return loss_sum, count

    def _grads(self, x, y, weight):
        with tf.GradientTape() as tape:
            loss = self.loss_fn(y, self.model(x, training=True))
            scaled = loss * tf.cast(weight, loss.dtype)
        return loss, tape.gradient(scaled, self.model.trainable_variables)

    def _apply(self, grads):
        compression = self.hvd.Compression.fp16 if self.compression == "fp16" else self.hvd.Compression.none
        # Dense always: an Embedding's gradient is IndexedSlices (Horovod allgathers those) on a rank with
        # samples but zeros on a rank without; both must enter the same collective.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        # A fixed name: Horovod pairs collectives across ranks by name, and in one step a rank may run this
        # from the fused graph (one micro-batch) while another runs it alone (no samples); the default
        # name derives from the graph's tensor names and would differ, which hung the job (seen here).
        # It keeps Horovod's "Horovod" prefix: a lost peer surfaces as a TF error naming this node, and
        # elastic_run tells Horovod's errors from the user's by that word (without it, a SIGKILLed peer
        # ended the survivor instead of rolling it back: seen in CI).
        reduced = self.hvd.grouped_allreduce(list(grads), op=self.hvd.Average, compression=compression,
                                             name="HorovodGroupedAllreduce_hvdkit_gradients",
                                             ignore_name_scope=True)
        self.optimizer.apply(reduced, self.model.trainable_variables)

    def _step(self, x, y, weight):
        loss, grads = self._grads(x, y, weight)
        self._apply(grads)
        return loss

    def train_step(self, data, step: Step) -> Tuple[float, int]:
        x_all, y_all = self._arrays(data)[:2]
        return self._train_on([(x_all[ids], y_all[ids], weight, len(ids))
                               for ids, weight in zip(step.micro_batches, step.weights) if len(ids)])

    def _train_on(self, batches) -> Tuple[float, int]:
        """One optimizer step over (x, y, weight, samples) micro-batches; none: a zero gradient."""
        if len(batches) == 1:  # the common case: one graph call per step, as in a hand-written loop
            x, y, weight, samples = batches[0]
            return float(self._one_step(x, y, tf.cast(weight, tf.float32))) * samples, samples
        total, loss_sum, count = None, 0.0, 0
        for x, y, weight, samples in batches:
            loss, grads = self._grad_step(x, y, tf.cast(weight, tf.float32))
            total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
            loss_sum += float(loss) * samples
            count += samples
        if total is None:
            total = [tf.zeros_like(v) for v in tf_variables(self.model.trainable_variables)]
        self._apply_step(total)
        return loss_sum, count

    def _eval_sums(self, x, y) -> Dict[str, float]:
        sums = {"loss": 0.0, "count": float(len(y))}
        if self.accuracy:
            sums["correct"] = 0.0
        if len(y):
            outputs = self.model(x, training=False)
            sums["loss"] = float(self.loss_fn(y, outputs)) * len(y)
            if self.accuracy:
                sums["correct"] = float(np.sum(np.argmax(outputs, axis=-1) == np.asarray(y)))
        return sums

    def eval_batch(self, data, ids: np.ndarray) -> Dict[str, float]:
        x_all, y_all = self._arrays(data)[:2]
        return self._eval_sums(x_all[ids], y_all[ids])

    def eval_sums(self, data, batch_size: int) -> Dict[str, float]:
        if not isinstance(data, TFSource):
            return super().eval_sums(data, batch_size)
        totals = self._eval_sums(np.zeros((0,)), np.zeros((0,)))  # the keys, zeroed
        for x, y in data.rank_dataset(self.rank, self.size).batch(batch_size):  # unshuffled, each example once
            for key, value in self._eval_sums(x, y).items():
                totals[key] += value
        return totals

    def parameter_checksums(self) -> List[Tuple[str, int]]:
        return [(v.path, zlib.crc32(np.ascontiguousarray(v.numpy()).tobytes())) for v in self.model.variables]

    # ---- state -------------------------------------------------------------------------------
    def state_to_bytes(self, progress: Dict[str, Any]) -> bytes:
        arrays = {f"model/{i}": v.numpy() for i, v in enumerate(self.model.variables)}
        arrays.update({f"optimizer/{i}": v.numpy() for i, v in enumerate(self.optimizer.variables)})
        buffer = io.BytesIO()
        np.savez(buffer, progress=np.array(json.dumps(progress)), **arrays)
        return buffer.getvalue()

    def state_from_bytes(self, blob: bytes) -> Dict[str, Any]:
        try:
            saved = np.load(io.BytesIO(blob), allow_pickle=False)
            for prefix, variables in (("model", self.model.variables), ("optimizer", self.optimizer.variables)):
                names = [k for k in saved.files if k.startswith(prefix + "/")]
                if len(names) != len(variables):
                    raise ValueError(f"{len(names)} saved {prefix} variables, this one has {len(variables)}")
                for i, v in enumerate(variables):
                    v.assign(saved[f"{prefix}/{i}"])
            return json.loads(str(saved["progress"]))
        except (ValueError, KeyError, OSError) as e:
            raise HvdkitError(f"checkpoint does not fit this model or optimizer ({e}); use another --checkpoint-dir") from None
