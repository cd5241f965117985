"""Both Keras adapters in one process at world size 1 (``hvdkit.keras.LocalProcess``, no Horovod collectives):
equal to plain Keras code, and a mid-epoch checkpoint resumes to the uninterrupted result."""
import numpy as np
import pytest

from hvdkit import TrainConfig, Trainer
from hvdkit.errors import HvdkitError
from hvdkit.sharding import plan_epoch

tf = pytest.importorskip("tensorflow")
from hvdkit.keras import KerasAdapter, KerasFitAdapter, LocalProcess  # noqa: E402
import keras  # noqa: E402

RNG = np.random.default_rng(5)
X = RNG.normal(size=(30, 6)).astype(np.float32)
Y = RNG.integers(0, 3, size=30).astype(np.int64)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
QUIET = dict(progress_bar=False, lr_scaling="none", batch_size=4, seed=0)


def build(seed=3):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    return model, keras.optimizers.Adam(0.01)


def fit(mode, model_seed=3, **config):
    model, optimizer = build(model_seed)
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=LOSS)
        adapter = KerasFitAdapter(model)
    else:
        adapter = KerasAdapter(model, optimizer, LOSS)
    result = Trainer(adapter, TrainConfig(**dict(QUIET, **config)), process=LocalProcess()).fit((X, Y), (X, Y))
    return result, model


def flat(model):
    return np.concatenate([v.numpy().ravel() for v in model.variables])


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_local_keras_equals_plain_keras(mode):
    result, model = fit(mode, epochs=2)
    reference, optimizer = build()
    for epoch in range(2):
        for step in plan_epoch(30, 0, 1, 4, 0, epoch):
            ids = step.micro_batches[0]
            with tf.GradientTape() as tape:
                loss = LOSS(Y[ids], reference(X[ids], training=True))
            optimizer.apply(tape.gradient(loss, reference.trainable_variables), reference.trainable_variables)
    assert np.abs(flat(model) - flat(reference)).max() < 1e-5
    assert result.world_size == 1 and result.global_step == 16 and result.eval["samples"] == 30


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_local_keras_resume_gives_the_uninterrupted_result(tmp_path, mode):
    _, whole = fit(mode, epochs=2, checkpoint_dir=str(tmp_path / "a"))
    stopped, _ = fit(mode, epochs=2, checkpoint_dir=str(tmp_path / "b"), stop_after_steps=11)
    resumed, model = fit(mode, model_seed=77, epochs=2, checkpoint_dir=str(tmp_path / "b"))
    assert stopped.stopped_early and resumed.resumed_from["global_step"] == 11
    assert resumed.global_step == 16 and np.abs(flat(model) - flat(whole)).max() == 0.0


class CountingProcess(LocalProcess):
    """Counts, inside the traced step, how often gradients enter the allreduce (once per optimizer step?)."""

    def __init__(self):
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)

    def allreduce_gradients(self, grads, compression="none"):
        self.calls.assign_add(1)
        return super().allreduce_gradients(grads, compression)


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_accumulation_averages_once_per_optimizer_step(mode):
    model, optimizer = build()
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=LOSS)
        adapter = KerasFitAdapter(model)
    else:
        adapter = KerasAdapter(model, optimizer, LOSS)
    process = CountingProcess()
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=2, accumulation=3)), process=process).fit((X, Y))
    assert result.global_step == 2 * 3                     # 30 samples, 12 per step: 3 steps an epoch
    assert int(process.calls.numpy()) == result.global_step  # not once per micro-batch (18)


def test_regularizers_join_the_loop_objective_like_fit():
    def regularized():
        keras.utils.set_random_seed(4)
        return keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(
            8, activation="tanh", kernel_regularizer=keras.regularizers.l2(0.05), activity_regularizer="l1"),
            keras.layers.Dense(3)])
    finals = {}
    for mode in ("loop", "fit"):
        model = regularized()
        if mode == "fit":
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
            adapter = KerasFitAdapter(model)
        else:
            adapter = KerasAdapter(model, keras.optimizers.SGD(0.1), LOSS)
        Trainer(adapter, TrainConfig(**dict(QUIET, epochs=2)), process=LocalProcess()).fit((X, Y))
        finals[mode] = flat(model)
    plain = regularized()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    assert np.abs(finals["loop"] - finals["fit"]).max() < 1e-5
    assert np.abs(finals["loop"] - flat(plain)).max() > 1e-3   # the regularizers did change the result


def test_a_model_trained_by_fit_with_batchnorm_still_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                              keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    Trainer(KerasFitAdapter(model), TrainConfig(**dict(QUIET, sync_batchnorm=True)), process=LocalProcess()).fit((X, Y))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert np.abs(loaded.predict(X, verbose=0) - model.predict(X, verbose=0)).max() < 1e-6


@pytest.mark.parametrize("mode,accumulation", [("loop", 1), ("loop", 2), ("fit", 1)])
@pytest.mark.parametrize("shard", [False, True])
def test_the_gradient_norm_is_read_at_most_once_per_step(monkeypatch, mode, accumulation, shard):
    # An eager read of the norm variable is ~0.45 ms of a small model's step: the loop asks for the verdict in
    # several places (the trainer, the skip undo, the fit callback), the adapter reads it once per step, and a
    # one-batch loop step not at all (the traced step returns the norm with the loss, one transfer).
    from hvdkit.keras.adapter import UpdateGate
    from hvdkit.keras.zero import ShardedOptimizer
    reads = []
    for cls, name in ((UpdateGate, "last"), (ShardedOptimizer, "last_step")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, real=real: reads.append(1) or real(self))
    result, _ = fit(mode, epochs=2, nonfinite="skip", shard_optimizer=shard, accumulation=accumulation)
    expected = 0 if (mode, accumulation) == ("loop", 1) else result.global_step
    assert result.global_step == 16 // accumulation and len(reads) == expected, (result.global_step, len(reads))


@pytest.mark.parametrize("shard", [False, True])
def test_the_norm_handed_over_with_the_loss_is_the_checked_one(shard):
    # The one-batch loop step returns [loss, norm]: the verdict must hold the norm the update was gated on (read
    # back from the variable after the step), and the losses must be those of a run without the check.
    from hvdkit.callbacks import Callback

    class Grab(Callback):
        def __init__(self):
            self.pairs, self.losses = [], []

        def on_step_end(self, trainer, step, loss):
            adapter = trainer.adapter
            if adapter.nonfinite != "off":
                self.pairs.append((adapter.last_step_finite(), float(adapter._checked_norm().numpy())))
            self.losses.append(loss)

    runs = {}
    for nonfinite in ("stop", "off"):
        model, optimizer = build()
        grab = Grab()
        Trainer(KerasAdapter(model, optimizer, LOSS), TrainConfig(**dict(QUIET, epochs=1, nonfinite=nonfinite,
                                                                          shard_optimizer=shard)),
                [grab], process=LocalProcess()).fit((X, Y))
        runs[nonfinite] = grab
    pairs = runs["stop"].pairs
    assert len(pairs) == 8 and all(finite and norm == read and norm > 0 for (finite, norm), read in pairs), pairs
    assert len({norm for (_, norm), _ in pairs}) == 8   # a new norm every step, not a stale one
    np.testing.assert_allclose(runs["stop"].losses, runs["off"].losses, rtol=1e-6)


def test_fit_refuses_several_steps_per_execution():
    from hvdkit import HvdkitError
    model, optimizer = build()
    model.compile(optimizer=optimizer, loss=LOSS, steps_per_execution=4)
    with pytest.raises(HvdkitError, match=r"steps_per_execution=4\) runs several steps per batch hook.*compile with "
                                          r"steps_per_execution=1"):
        KerasFitAdapter(model)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_fit_refuses_another_accumulation_on_an_optimizer_built_by_an_earlier_fit(first, second):
    """Keras fixes gradient_accumulation_steps when its optimizer is built: a second fit asking another one would
    silently apply every first-th step (or be refused with a reason that did not say so)."""
    model, optimizer = build()
    model.compile(optimizer=optimizer, loss=LOSS)
    adapter = KerasFitAdapter(model)
    Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1, accumulation=first)), process=LocalProcess()).fit((X, Y))
    before = flat(model)
    with pytest.raises(HvdkitError, match=rf"^gradient accumulation {second} on a Keras optimizer built \(by an "
                                          rf"earlier fit, or before this one\) for {first}; .* or keep "
                                          rf"accumulation={first}$"):
        Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1, accumulation=second)), process=LocalProcess()).fit((X, Y))
    assert np.array_equal(flat(model), before)   # refused before any step
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1, accumulation=first)),
                     process=LocalProcess()).fit((X, Y))
    assert result.global_step == -(-30 // (4 * first))   # the same accumulation still trains


def test_fit_refuses_an_accumulation_the_optimizer_was_given_otherwise():
    model, optimizer = build()
    optimizer.gradient_accumulation_steps = 4   # Keras would apply every 4th step while the kit counts each
    model.compile(optimizer=optimizer, loss=LOSS)
    with pytest.raises(HvdkitError, match=r"^the optimizer's gradient_accumulation_steps=4 differs from "
                                          r"accumulation=1; leave it unset and pass accumulation=4 to TrainConfig$"):
        Trainer(KerasFitAdapter(model), TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, Y))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_loop_step_is_traced_once_for_every_batch_size(accumulation):
    """30 samples in batches of 4: every epoch ends on a batch of 2 (with accumulation 2, a step of micro-batches of
    4 and 2). reduce_retracing alone traced the step again for the short batch (a whole graph's tracing while the
    other ranks wait); read back from TensorFlow: one trace of the step that ran."""
    model, optimizer = build()
    adapter = KerasAdapter(model, optimizer, LOSS)
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=2, accumulation=accumulation)),
                     process=LocalProcess()).fit((X, Y))
    assert result.global_step == (16 if accumulation == 1 else 8)
    ran = adapter._one_step if accumulation == 1 else adapter._grad_step
    assert ran.step.experimental_get_tracing_count() == 1


def eval_model(mode, first_layers=(), **compile_kwargs):
    """An MLP with BatchNorm and Dropout(0.5) (a forward in training mode gives other numbers than inference)."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input(shape=(6,)), *first_layers, keras.layers.Dense(8),
                              keras.layers.BatchNormalization(), keras.layers.Activation("tanh"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(3)])
    optimizer = keras.optimizers.Adam(0.01)
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=LOSS, **compile_kwargs)
        return model, KerasFitAdapter(model)
    return model, KerasAdapter(model, optimizer, LOSS)


def assert_inference_eval(result, model):
    """Loss and accuracy equal the model's own in inference mode on all 30 samples at once."""
    logits = model(X, training=False).numpy()
    assert result.eval["samples"] == 30
    assert result.eval["loss"] == pytest.approx(float(LOSS(Y, logits)), rel=1e-5)
    assert result.eval["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, axis=-1) == Y)))


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_evaluation_is_one_traced_inference_forward_per_batch(mode):
    """Evaluation runs the model in a graph, in inference mode, traced once though the last of 30 samples' batches
    of 4 holds 2 (eager, a small model's forward cost several times its graph's)."""
    model, adapter = eval_model(mode)
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, Y), (X, Y))
    assert_inference_eval(result, model)
    assert adapter._eval_step.step.experimental_get_tracing_count() == 1


class EagerOnly(keras.layers.Layer):
    """Code that runs eagerly only (numpy on its input): a model holding it must be compiled run_eagerly=True."""

    def call(self, x):
        if not isinstance(x, keras.KerasTensor):   # Keras' symbolic build passes; a graph's tensor fails
            np.asarray(x)
        return x

    def compute_output_shape(self, input_shape):   # else Sequential leaves the layers after it unbuilt
        return input_shape


def test_a_model_compiled_to_run_eagerly_is_evaluated_eagerly():
    """Keras' fit trains it eagerly; tracing its evaluation failed ("Cannot convert a symbolic tf.Tensor")."""
    model, adapter = eval_model("fit", first_layers=[EagerOnly()], run_eagerly=True)
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, Y), (X, Y))
    assert_inference_eval(result, model)
    assert adapter._eval_step is None


class Numpy(keras.layers.Layer):
    """Numpy in a custom layer: Keras cannot run it on symbolic inputs (KerasTensors), so Sequential leaves the
    layers after it unbuilt; such a model trains only compiled with run_eagerly=True."""

    def call(self, x):
        return tf.convert_to_tensor(np.tanh(np.asarray(x)))


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_a_sequential_model_with_unbuilt_layers_is_refused_in_one_line(mode):
    """Keras' own fit builds such layers at the first step; the kit builds and broadcasts the optimizer before it,
    and Keras failed later with "Unknown variable". Called once on a batch, the same model trains (Keras' fit,
    eagerly: the loop traces its step, which this layer cannot be)."""
    model, adapter = eval_model(mode, first_layers=[Numpy()], run_eagerly=True)
    assert model.built and not model.trainable_variables   # what Keras reports
    with pytest.raises(HvdkitError, match=r"^the Keras model's layers dense\w*, batch_normalization\w*, .* are not "
                                          r"built; call the model once on a batch, model\(x\[:1\]\)"):
        Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, Y), (X, Y))
    if mode == "fit":
        model(X[:1])
        result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, Y), (X, Y))
        assert result.global_step == 8 and np.isfinite(result.eval["loss"])


class Subclassed(keras.Model):
    """A subclassed model without a build() of its own: Keras' model.build(shape) warns, marks it built and leaves its
    layers unbuilt (no weights at all until the first call)."""

    def __init__(self):
        super().__init__()
        self.hidden, self.norm = keras.layers.Dense(8), keras.layers.BatchNormalization()
        self.flat, self.out = keras.layers.Flatten(), keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.flat(self.norm(self.hidden(x), training=training)))


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_a_subclassed_model_built_without_its_layers_is_refused_then_trains_once_called(mode):
    """Before, the optimizer was built over no variables and Keras failed at the first step ("Unknown variable").
    Flatten holds no weights: it is left to build at its first call, not named."""
    keras.utils.set_random_seed(3)
    model = Subclassed()
    with pytest.warns(UserWarning, match="does not have a `build\\(\\)` method"):
        model.build((None, 6))
    assert model.built and not model.trainable_variables   # what Keras reports
    if mode == "fit":
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
        adapter = KerasFitAdapter(model)
    else:
        adapter = KerasAdapter(model, keras.optimizers.Adam(0.01), LOSS)
    trainer = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess())
    with pytest.raises(HvdkitError, match=r"^the Keras model's layers dense\w*, batch_normalization\w*, dense\w* are "
                                          r"not built; call the model once on a batch, model\(x\[:1\]\)"):
        trainer.fit((X, Y), (X, Y))
    model(X[:1])
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, Y), (X, Y))
    assert result.global_step == 8 and np.isfinite(result.eval["loss"])
    assert len(model.trainable_variables) == 6 and all(   # trained: the biases and BatchNorm's beta left zero
        not np.allclose(v.numpy(), 0) for v in model.trainable_variables if "bias" in v.path or "beta" in v.path)


class OwnBuild(keras.Model):
    """Builds its weighted layers in its own build(); calls Add and Concatenate (which override build only to check
    shapes, and stay unbuilt until called) and holds a layer it never calls."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.out = keras.layers.Dense(4), keras.layers.Dense(4), keras.layers.Dense(3)
        self.add, self.cat = keras.layers.Add(), keras.layers.Concatenate()
        self.unused = keras.layers.Dense(5)

    def build(self, input_shape):
        self.left.build(input_shape)
        self.right.build(input_shape)
        self.out.build((input_shape[0], 8))

    def call(self, x):
        a, b = self.left(x), self.right(x)
        return self.out(self.cat([self.add([a, b]), a]))


class CalledOnce(OwnBuild):
    build = keras.layers.Layer.build   # Keras' default: the layers are built by calling the model on a batch


@pytest.mark.parametrize("how", ["own build()", "called once"])
def test_built_models_with_unbuilt_weightless_or_unused_layers_train(how):
    """Not refused (a first version of the check named add, concatenate and the unused dense): a model with its own
    build(), and a subclassed model without one once it was called on a batch."""
    keras.utils.set_random_seed(3)
    if how == "own build()":
        model = OwnBuild()
        model.build((None, 6))
    else:
        model = CalledOnce()
        model(X[:1])
    adapter = KerasAdapter(model, keras.optimizers.Adam(0.01), LOSS)
    before = [v.numpy().copy() for v in model.trainable_variables]
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, Y), (X, Y))
    assert result.global_step == 8 and np.isfinite(result.eval["loss"])
    assert len(before) == 6 and all(not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


# ---- an idle micro-batch: one weight-0 stand-in row, never zero rows (TF's oneDNN kernels mishandle those) ----
X49 = np.random.default_rng(8).normal(size=(49, 8, 8, 1)).astype(np.float32)
Y49 = np.random.default_rng(9).integers(0, 3, size=49).astype(np.int64)
IDLE = dict(QUIET, epochs=2, accumulation=2)   # 49 samples, 2 x 4 a step: the last step's micro-batches are [1, 0]


class KerasLogs(keras.callbacks.Callback):
    """What a user's Keras callback sees in ``fit``: every batch's and epoch's logs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(dict(logs))

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(dict(logs))


def idle_fit(build, mode, sync, x=X49, **config):
    model = build()
    optimizer = keras.optimizers.Adam(0.01)
    logs = KerasLogs()
    if mode == "fit":   # with a compiled metric Keras updates without sample weights
        model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
        adapter = KerasFitAdapter(model, keras_callbacks=[logs])
    else:
        adapter = KerasAdapter(model, optimizer, LOSS)
    result = Trainer(adapter, TrainConfig(**dict(IDLE, sync_batchnorm=sync, **config)),
                     process=LocalProcess()).fit((x, Y49))
    result.keras_logs = logs.seen
    return result, model


def dense_bn():
    """What a stand-in row could leak into: BatchNorm's moments, an activity regularizer (a call loss), dropout;
    and a kernel regularizer; no convolution, so zero rows work here too."""
    keras.utils.set_random_seed(6)
    L = keras.layers
    return keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(
        16, kernel_regularizer=keras.regularizers.l2(0.01), activity_regularizer=keras.regularizers.l1(0.01)),
        L.BatchNormalization(), L.ReLU(), L.Dropout(0.3), L.Dense(3)])


@pytest.mark.parametrize("mode", ["loop", "fit"])
@pytest.mark.parametrize("sync", [False, True])
def test_an_idle_micro_batch_on_a_stand_in_row_trains_as_on_zero_rows(monkeypatch, mode, sync):
    from hvdkit.feed import IndexedFeed
    from hvdkit.keras.feed import ArrayFeed
    last = plan_epoch(49, 0, 1, 4, 0, 0, 2)[-1]
    assert [len(ids) for ids in last.micro_batches] == [1, 0]
    stand_ins = []
    real_idle = ArrayFeed.idle_batch
    monkeypatch.setattr(ArrayFeed, "idle_batch", lambda self: stand_ins.append(1) or real_idle(self))
    with_stand_in, model = idle_fit(dense_bn, mode, sync)
    assert stand_ins and len(ArrayFeed((X49, Y49)).idle_batch()[0]) == 1   # one row stood in
    # the reference: the same idle micro-batch on zero rows (flagged too: in one process SyncBatchNorm is the
    # plain layer, whose zero-row moments the flag also keeps out; its Horovod path is the zoo's)
    monkeypatch.setattr(ArrayFeed, "idle_batch", IndexedFeed.empty_batch)
    with_zero_rows, reference = idle_fit(dense_bn, mode, sync)
    assert np.abs(flat(model) - flat(reference)).max() < 1e-6   # weights, BatchNorm's moving statistics
    assert abs(with_stand_in.history[-1]["loss"] - with_zero_rows.history[-1]["loss"]) < 1e-6
    # fit: a user's Keras callbacks see the same training logs (running loss, accuracy), batch by batch
    assert len(with_stand_in.keras_logs) == len(with_zero_rows.keras_logs) == (30 if mode == "fit" else 0)
    for a, b in zip(with_stand_in.keras_logs, with_zero_rows.keras_logs):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a), (a, b)


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_a_stand_in_row_is_finite_where_the_first_sample_is_not(monkeypatch, mode):
    # weight 0 cannot hide a NaN (it reaches the gradients backwards): the stand-in is the first finite sample, so
    # a NaN in sample 0 fails its own step only, not also every epoch's last (idle) one
    x = X49.copy()
    x[0, 0, 0, 0] = np.nan
    result, _ = idle_fit(dense_bn, mode, False, x=x, nonfinite="skip")
    assert result.skipped_steps == 2 and result.global_step == 14   # sample 0's step in each epoch, no other


def pooled_cnn():
    """Two convolutions, BatchNorm and max pooling: on an empty batch TF's oneDNN Conv2D gives the wrong shape or
    fails and MaxPool's gradient aborts the process, on CPUs with AMX/AVX512-FP16 (README "Empty ranks")."""
    keras.utils.set_random_seed(7)
    L = keras.layers
    return keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same", activation="relu"),
                             L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(),
                             L.Flatten(), L.Dense(3)])


def test_an_idle_micro_batch_trains_a_pooled_cnn_alike_in_both_adapters():
    finals = {}
    for mode in ("loop", "fit"):
        result, model = idle_fit(pooled_cnn, mode, sync=True)
        assert result.global_step == 2 * 7 and np.isfinite(flat(model)).all()
        finals[mode] = flat(model)
    assert np.abs(finals["loop"] - finals["fit"]).max() < 1e-5
    assert np.abs(finals["loop"] - flat(pooled_cnn())).max() > 1e-3   # it trained


def test_a_stand_in_drops_the_call_losses_and_keeps_the_weight_regularizers():
    from hvdkit.keras import standin
    model = dense_bn()
    model(X49[:2], training=True)   # the call losses (here the activity regularizer's) of this call
    weights = [v.regularizer(v) for v in model.trainable_weights if v.regularizer is not None]
    assert len(weights) == 1 and len(model.losses) == 2
    total = float(tf.add_n(model.losses))
    assert float(standin.uncounted(model, tf.float32)) == 0.0   # not flagged: everything counts
    with standin.idle():
        kept = total - float(standin.uncounted(model, tf.float32))
    assert abs(kept - float(weights[0])) < 1e-6 and abs(total - kept) > 1e-3
    assert standin.uncounted(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), tf.float32) is None
