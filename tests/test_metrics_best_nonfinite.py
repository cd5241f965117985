"""User metrics, best-k checkpoints, early stopping and the non-finite guard (H2 items 4-6).

In-process at world size 1 (``LocalProcess``) for torch and both Keras adapters; what several ranks add is
shown by playing each rank's exact evaluation share in one process (the shares are disjoint and unpadded, and
the trainer sums per-batch sums and metric states over ranks), and by two launches at 2 workers where rank 1
alone gets a NaN loss: every rank must stop (or skip) in that same step.
"""
import json
import math
import os
import re
import sys

import numpy as np
import pytest

from hvdkit import HvdkitError, TrainConfig, Trainer
from hvdkit.callbacks import Callback
from fault_callbacks import RaiseOnce
from hvdkit.checkpoint import BestStore, CheckpointStore
from hvdkit.errors import StoppedOnEveryRank
from hvdkit.sharding import eval_indices

from proc import REPO, WORKERS, explain, launch, run

torch = pytest.importorskip("torch")
from hvdkit.torch import LocalProcess, TorchAdapter  # noqa: E402

RNG = np.random.default_rng(7)
X = RNG.normal(size=(48, 6)).astype(np.float32)
Y = RNG.integers(0, 4, size=48).astype(np.int64)
X_EVAL = RNG.normal(size=(23, 6)).astype(np.float32)
Y_EVAL = RNG.integers(0, 4, size=23).astype(np.int64)
QUIET = dict(progress_bar=False, lr_scaling="none", batch_size=4, seed=0, shuffle=False)  # step k: samples 4k-4..4k-1


def top2_hits(outputs, targets):
    return (outputs.topk(2, dim=1).indices == targets[:, None]).any(dim=1).sum()


def abs_error(outputs, targets):  # a regression-style per-sample value: |max logit - label|
    return (outputs.max(dim=1).values - targets.float()).abs().sum()


def torch_model(seed=11):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def torch_fit(callbacks=(), x=X, y=Y, loss_fn=torch.nn.functional.cross_entropy, lr=0.05, metrics=None,
              eval_data=(X_EVAL, Y_EVAL), **config):
    model = torch_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    optimizer.param_groups[0]["lr"] = lr   # Adam's constructor refuses NaN; a schedule could still produce one
    adapter = TorchAdapter(model, optimizer, loss_fn, metrics=metrics)
    trainer = Trainer(adapter, TrainConfig(**dict(QUIET, **config)), callbacks=callbacks, process=LocalProcess())
    return trainer.fit((x, y), eval_data), model, adapter


def flat_torch(model):
    return np.concatenate([t.detach().numpy().ravel() for t in model.state_dict().values()])


class Snapshots(Callback):
    """The flat parameters after every step, by global step (``flat`` reads them)."""
    all_ranks = True

    def __init__(self, flat):
        self.flat, self.after = flat, {}

    def on_step_end(self, trainer, global_step, loss):
        self.after[global_step] = self.flat()


# ---- 4. metrics ---------------------------------------------------------------------------------------
def test_torch_user_metrics_are_exact_means_of_per_batch_sums():
    result, model, adapter = torch_fit(epochs=1, metrics={"top2": top2_hits, "abs_err": abs_error},
                                       eval_batch_size=5)  # 23 samples: batches of 5, 5, 5, 5, 3
    with torch.no_grad():
        out = model(torch.from_numpy(X_EVAL))
    y = torch.from_numpy(Y_EVAL)
    assert result.eval["samples"] == 23
    assert result.eval["top2"] == pytest.approx(float(top2_hits(out, y)) / 23, abs=1e-12)
    assert result.eval["abs_err"] == pytest.approx(float(abs_error(out, y)) / 23, rel=1e-6)
    assert result.history[-1]["eval_top2"] == result.eval["top2"]
    # two ranks: each evaluates its own contiguous share (disjoint, unpadded); the trainer sums the sums
    feed = adapter.make_feed((X_EVAL, Y_EVAL))
    shares = [np.asarray(eval_indices(23, rank, 2)) for rank in (0, 1)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(23))
    summed = {}
    for rank in (0, 1):
        for inputs, targets in feed.eval_batches(rank, 2, 4):
            for key, value in adapter.eval_batch(inputs, targets).items():
                summed[key] = summed.get(key, 0.0) + value
    assert summed["count"] == 23
    assert summed["top2"] / 23 == pytest.approx(result.eval["top2"], abs=1e-12)
    assert summed["correct"] / 23 == pytest.approx(result.eval["accuracy"], abs=1e-12)


def test_metric_names_evaluation_reports_itself_are_refused():
    model = torch_model()
    for name in ("loss", "count", "accuracy", "samples", ""):
        with pytest.raises(HvdkitError, match="is taken or empty"):
            TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy,
                         metrics={name: top2_hits})


tf = pytest.importorskip("tensorflow")
from hvdkit.keras import KerasAdapter, KerasFitAdapter, make_adapter  # noqa: E402
from hvdkit.keras import LocalProcess as KerasLocal  # noqa: E402
import keras  # noqa: E402

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def keras_model(seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(4)])


def keras_adapter(mode, loss=LOGITS, metrics=None, compiled=None, lr=0.05):
    model = keras_model()
    optimizer = keras.optimizers.Adam(lr)
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=loss, metrics=compiled)
        return KerasFitAdapter(model, metrics=metrics), model
    return KerasAdapter(model, optimizer, loss, metrics=metrics), model


def keras_fit(mode, callbacks=(), x=X, y=Y, eval_data=(X_EVAL, Y_EVAL), loss=LOGITS, metrics=None, compiled=None,
              **config):
    adapter, model = keras_adapter(mode, loss=loss, metrics=metrics, compiled=compiled)
    trainer = Trainer(adapter, TrainConfig(**dict(QUIET, **config)), callbacks=callbacks, process=KerasLocal())
    return trainer.fit((x, y), eval_data), model, adapter


def flat_keras(model):
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


def keras_top2_hits(y_true, y_pred):
    return tf.reduce_sum(tf.cast(tf.math.in_top_k(tf.cast(y_true, tf.int32), y_pred, 2), tf.float32))


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_keras_metrics_sums_and_stateful_ones_are_exact_over_ranks(mode):
    """Per-batch sums and Keras Metric objects (fit: compiled ones too) equal numpy over the whole set; two ranks'
    summed states (each rank's exact share) give the same values: no padding duplicates, nothing missing."""
    compiled = ["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3")] if mode == "fit" else None
    metrics = {"top2": keras_top2_hits, "top3s": keras.metrics.SparseTopKCategoricalAccuracy(k=3)}
    result, model, adapter = keras_fit(mode, epochs=1, metrics=metrics, compiled=compiled, eval_batch_size=5)
    logits = model(X_EVAL, training=False).numpy()
    ranked = np.argsort(-logits, axis=1)
    expected = {"top2": np.mean([Y_EVAL[i] in ranked[i, :2] for i in range(23)]),
                "top3s": np.mean([Y_EVAL[i] in ranked[i, :3] for i in range(23)]),
                "accuracy": np.mean(ranked[:, 0] == Y_EVAL)}
    if mode == "fit":
        expected["top3"] = expected["top3s"]
    for name, value in expected.items():
        assert result.eval[name] == pytest.approx(value, abs=1e-6), name
    # the same evaluation as two ranks: each rank's state over its share, summed, then the results
    feed = adapter.make_feed((X_EVAL, Y_EVAL))
    states, sums = [], {}
    for rank in (0, 1):
        adapter.reset_eval_state()
        for inputs, targets in feed.eval_batches(rank, 2, 4):
            for key, value in adapter.eval_batch(inputs, targets).items():
                sums[key] = sums.get(key, 0.0) + value
        states.append(np.asarray(adapter.eval_state()))
    results = adapter.eval_results(states[0] + states[1])
    assert sums["count"] == 23 and sums["top2"] / 23 == pytest.approx(expected["top2"], abs=1e-6)
    for name in ("top3s",) + (("top3", "accuracy") if mode == "fit" else ()):
        assert results[name] == pytest.approx(expected[name], abs=1e-6), name


# ---- 5. best checkpoints and early stopping ---------------------------------------------------------
SCRIPT = {}   # epoch (0-based) -> the value the "score" metric reports in that epoch's evaluation


class EpochClock(Callback):
    """Tells ``scripted_score`` which epoch is being trained (every rank)."""
    all_ranks = True
    epoch = 0

    def on_epoch_begin(self, trainer, epoch, steps):
        EpochClock.epoch = epoch


def scripted_score(outputs, targets):
    return SCRIPT[EpochClock.epoch] * len(targets)   # a per-batch sum whose mean is the scripted value


def test_best_k_keeps_exactly_the_k_best_with_atomic_manifests_and_resume_loads_latest(tmp_path):
    SCRIPT.clear()
    SCRIPT.update(enumerate([0.50, 0.70, 0.60, 0.40, 0.65, 0.55, 0.45]))
    ckpt = tmp_path / "ckpt"
    result, model, _ = torch_fit([EpochClock()], epochs=6, metrics={"score": scripted_score}, checkpoint_dir=str(ckpt),
                                 keep_best=2, monitor="eval_score", monitor_mode="max")
    best = BestStore(str(ckpt / "best"), keep=2)
    kept = best.ranked()
    assert [e for _, e, _, _ in kept] == [2, 5] and [v for v, _, _, _ in kept] == pytest.approx([0.70, 0.65])
    for _, _, number, manifest in kept:
        blob, verified = best.verify(number)          # sha256 and size match: complete, atomic
        assert verified["monitor"] == "eval_score" and verified["monitor_mode"] == "max"
        saved = torch.load(__import__("io").BytesIO(blob), weights_only=True)
        assert saved["progress"]["epoch"] == manifest["epoch"] and saved["progress"]["position"] == 0
    assert not [p for p in os.listdir(ckpt / "best") if p.startswith(".tmp")]
    assert result.best["value"] == pytest.approx(0.70) and result.best["epoch"] == 2
    # resume continues from the newest regular checkpoint (epoch 6), never from best/
    resumed, _, _ = torch_fit([EpochClock()], epochs=7, metrics={"score": scripted_score}, checkpoint_dir=str(ckpt),
                              keep_best=2, monitor="eval_score", monitor_mode="max")
    assert resumed.resumed_from["epoch"] == 6 and resumed.epochs_done == 7
    assert [e for _, e, _, _ in best.ranked()] == [2, 5]    # 0.45 at epoch 7 is not among the 2 best


def test_best_checkpoints_hold_the_random_state_of_their_own_epoch(tmp_path):
    """A best checkpoint is the same state as the regular checkpoint of its epoch, random state included (Dropout
    draws from it every step): resuming from either continues identically."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4))
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.functional.cross_entropy)
    config = TrainConfig(**dict(QUIET, epochs=2, checkpoint_dir=str(tmp_path), keep_best=2))
    Trainer(adapter, config, process=LocalProcess()).fit((X, Y), (X_EVAL, Y_EVAL))

    def progress_of(store):
        return [torch.load(__import__("io").BytesIO(store.verify(n)[0]), weights_only=True)["progress"]
                for n in store.numbers()]
    regular = {p["epoch"]: p for p in progress_of(CheckpointStore(str(tmp_path)))}
    best = progress_of(BestStore(str(tmp_path / "best"), keep=2))
    assert sorted(p["epoch"] for p in best) == [1, 2] and regular[1]["rng"] != regular[2]["rng"]
    for p in best:
        assert p["rng"] == regular[p["epoch"]]["rng"], p["epoch"]


def test_best_store_drops_entries_of_a_timeline_that_was_rolled_back(tmp_path):
    store = BestStore(str(tmp_path), keep=3)
    for epoch, value in [(1, 0.3), (2, 0.2), (3, 0.25), (4, 0.1)]:
        store.offer(b"x%d" % epoch, {"epoch": epoch}, "eval_loss", value, "min")
    assert [(v, e) for v, e, _, _ in store.ranked()] == [(0.1, 4), (0.2, 2), (0.25, 3)]
    # the job resumed from a checkpoint of epoch 2: epochs 3 and 4 of the lost timeline must not count
    assert store.offer(b"again", {"epoch": 3}, "eval_loss", 0.5, "min")
    assert [(v, e) for v, e, _, _ in store.ranked()] == [(0.2, 2), (0.5, 3)]   # epoch 1's was dropped at epoch 4
    assert store.offer(b"third", {"epoch": 4}, "eval_loss", 0.9, "min")          # fewer than 3 kept: kept
    assert store.offer(b"worse", {"epoch": 5}, "eval_loss", 0.95, "min") is None  # not among the 3 best
    assert store.offer(b"tie", {"epoch": 6}, "eval_loss", 0.9, "min") is None     # a tie keeps the older one
    assert [e for _, e, _, _ in store.ranked()] == [2, 3, 4] and len(os.listdir(str(tmp_path))) == 6


STOPPING = [0.50, 0.60, 0.55, 0.58, 0.61, 0.40, 0.70, 0.71]   # patience 2, min_delta 0.02: stops after epoch 4


def stopping_fit(tmp_path=None, callbacks=(), epochs=8, **config):
    SCRIPT.clear()
    SCRIPT.update(enumerate(STOPPING))
    return torch_fit([EpochClock(), *callbacks], epochs=epochs, metrics={"score": scripted_score},
                     monitor="eval_score", monitor_mode="max", early_stopping_patience=2, min_delta=0.02, **config)


def test_early_stopping_stops_at_the_right_evaluation():
    result, _, _ = stopping_fit()
    assert result.stopped_early and result.epochs_done == 4 and len(result.history) == 4
    best = result.best
    assert (best["monitor"], best["mode"], best["epoch"], best["bad"]) == ("eval_score", "max", 2, 2)
    assert (best["value"], best["last"]) == pytest.approx((0.60, 0.58))




def test_early_stopping_decision_survives_an_elastic_rollback_and_a_resume(tmp_path):
    from horovod.common.exceptions import HorovodInternalError
    whole, whole_model, _ = stopping_fit()
    # 12 steps an epoch; commits every 5 steps: a lost peer at step 44 (epoch 4) rolls back to the commit at step
    # 40, whose progress carries the record of epochs 1-3 (one evaluation without improvement)
    lost = RaiseOnce(44, HorovodInternalError("peer lost (simulated)"))
    result, model, _ = stopping_fit(callbacks=[lost], elastic=True, commit_every=5, durable_every=1,
                                    checkpoint_dir=str(tmp_path / "elastic"))
    assert lost.fired and result.resets == 1
    assert result.stopped_early and result.epochs_done == 4 and result.best == whole.best
    assert np.abs(flat_torch(model) - flat_torch(whole_model)).max() == 0.0
    committed = [json.loads(p.read_text()) for p in sorted((tmp_path / "elastic").glob("ckpt-*.json"))]
    assert committed[-1]["best"]["bad"] == 2 and committed[-1]["epoch"] == 4
    # a whole-job restart mid-epoch 4 resumes the record from the checkpoint and stops after epoch 4 too
    stopped, _, _ = stopping_fit(checkpoint_dir=str(tmp_path / "static"), stop_after_steps=42)
    assert stopped.epochs_done == 3
    resumed, _, _ = stopping_fit(checkpoint_dir=str(tmp_path / "static"))
    assert resumed.resumed_from["global_step"] == 42 and resumed.epochs_done == 4 and resumed.stopped_early
    assert resumed.best == whole.best
    # and a run resumed after it stopped early stays stopped (the recorded verdict), training nothing
    again, _, _ = stopping_fit(checkpoint_dir=str(tmp_path / "static"))
    assert again.stopped_early and again.global_step == resumed.global_step and again.history == []


def test_monitoring_bad_names_fails_before_or_at_the_first_evaluation(tmp_path):
    with pytest.raises(HvdkitError, match="cannot tell whether eval_score should go up or down"):
        torch_fit(epochs=1, early_stopping_patience=1, monitor="eval_score")
    with pytest.raises(HvdkitError, match="keep_best needs a checkpoint directory"):
        torch_fit(epochs=1, keep_best=1)
    with pytest.raises(HvdkitError, match="needs evaluation data"):
        torch_fit(epochs=1, early_stopping_patience=1, eval_data=None)
    with pytest.raises(StoppedOnEveryRank, match=r"^the monitored metric eval_top9 is not among the metrics of epoch 1"):
        torch_fit(epochs=1, early_stopping_patience=1, monitor="eval_top9", monitor_mode="max")


# ---- 6. non-finite losses and gradients -------------------------------------------------------------
def with_nan_rows(*rows):
    """X with NaN features in the given samples (with shuffle off, sample i is in step i // 4 + 1)."""
    x = X.copy()
    for row in rows:
        x[row] = np.nan
    return x


def test_torch_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    snaps = Snapshots(lambda: None)
    with pytest.raises(StoppedOnEveryRank) as error:
        torch_fit([snaps], x=with_nan_rows(21), epochs=2, checkpoint_dir=str(ckpt), checkpoint_every=2)
    message = str(error.value)
    assert "\n" not in message
    assert re.match(r"^non-finite loss \(nan on rank 0\) at epoch 1, step 6; stopped on every rank without applying "
                    r"it \(lower --lr.*--nonfinite skip.*\); the last good checkpoint is .*ckpt-00000001\.bin$",
                    message), message
    assert max(snaps.after) == 5                      # the bad step reached no callback
    store = CheckpointStore(str(ckpt))
    blob, manifest = store.load_latest()               # nothing written after the bad step; the last one loads
    assert manifest["global_step"] == 4 and store.numbers() == [0, 1]
    saved = torch.load(__import__("io").BytesIO(blob), weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    # and training resumes from it (the data fixed)
    resumed, _, _ = torch_fit(epochs=2, checkpoint_dir=str(ckpt), checkpoint_every=2)
    assert resumed.resumed_from["global_step"] == 4 and resumed.epochs_done == 2


def test_a_nan_learning_rate_stops_before_anything_non_finite_is_saved(tmp_path):
    """lr = NaN: step 1's gradients are finite but its update makes every parameter NaN. The commit after it
    finds that (checkpoint every step) and nothing is written; without commits, step 2's loss stops the run."""
    with pytest.raises(StoppedOnEveryRank, match=r"^non-finite parameters or buffers at epoch 1, step 1 .*no checkpoint "
                                                  r"was written"):
        torch_fit(lr=float("nan"), epochs=1, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    assert CheckpointStore(str(tmp_path)).numbers() == []
    with pytest.raises(StoppedOnEveryRank, match=r"^non-finite loss \(nan on rank 0\) at epoch 1, step 2;"):
        torch_fit(lr=float("nan"), epochs=1)
    with pytest.raises(StoppedOnEveryRank, match=r"^non-finite loss \(nan on rank 0\) at epoch 1, step 2 with "
                                                  r"non-finite parameters.*cannot recover"):
        torch_fit(lr=float("nan"), epochs=1, nonfinite="skip")


class Grab(Callback):
    """Holds the trainer's model (for Snapshots)."""
    all_ranks = True
    model = None

    def on_train_begin(self, trainer):
        Grab.model = trainer.adapter.model


def test_skip_mode_gives_up_after_ten_non_finite_steps_in_a_row():
    """Every sample from step 3 on is broken: the weights stay finite, but skipping would train nothing."""
    with pytest.raises(StoppedOnEveryRank, match=r"at epoch 1, step 12, the 10th non-finite step in a row"):
        torch_fit(x=with_nan_rows(*range(8, 48)), epochs=2, nonfinite="skip", eval_data=None)


def test_torch_skip_mode_skips_exactly_the_bad_steps_on_every_rank_and_trains_on():
    snaps = Snapshots(lambda: flat_torch(Grab.model).copy())
    # NaN rows 9 and 25: steps 3 and 7 of each epoch (12 steps an epoch, no shuffling)
    result, _, _ = torch_fit([Grab(), snaps], x=with_nan_rows(9, 25), epochs=2, nonfinite="skip", eval_data=None)
    assert result.skipped_steps == 4 and result.epochs_done == 2 and result.global_step == 24
    for step in range(2, 25):   # exactly the bad steps left the parameters (and Adam's state) alone
        assert np.array_equal(snaps.after[step], snaps.after[step - 1]) == (step in {3, 7, 15, 19}), step
    assert all(math.isfinite(h["loss"]) for h in result.history)      # skipped losses are left out
    assert [h["train_samples"] for h in result.history] == [40, 40]    # ... and so are their samples


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_keras_skip_mode_skips_exactly_the_bad_steps(mode):
    snaps = Snapshots(lambda: flat_keras(Grab.model).copy())
    result, model, adapter = keras_fit(mode, [Grab(), snaps], x=with_nan_rows(9, 25), epochs=1, nonfinite="skip",
                                       eval_data=None)
    assert result.skipped_steps == 2 and result.global_step == 12
    for step in range(2, 13):
        assert np.array_equal(snaps.after[step], snaps.after[step - 1]) == (step in {3, 7}), step
    assert math.isfinite(result.history[0]["loss"]) and result.history[0]["train_samples"] == 40
    assert int(adapter.optimizer.iterations.numpy()) == 12   # the schedule counts skipped steps (documented)


class Buffers(Callback):
    """BatchNorm's running mean after every step, by global step."""
    all_ranks = True

    def __init__(self, read):
        self.read, self.after = read, {}

    def on_train_begin(self, trainer):
        self.model = trainer.adapter.model

    def on_step_end(self, trainer, global_step, loss):
        self.after[global_step] = self.read(self.model).copy()


def test_torch_skip_mode_leaves_batchnorm_statistics_as_they_were():
    """A NaN sample in step 3 made the forward pass write NaN into BatchNorm's running statistics; the skipped
    step must undo that too, or every evaluation after it is NaN (and the end-of-epoch check stops the run)."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    adapter = TorchAdapter(model, torch.optim.Adam(model.parameters(), lr=0.01), torch.nn.functional.cross_entropy)
    stats = Buffers(lambda m: m[1].running_mean.detach().numpy())
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1, nonfinite="skip")), [stats],
                     process=LocalProcess()).fit((with_nan_rows(9), Y), (X_EVAL, Y_EVAL))
    assert result.skipped_steps == 1 and math.isfinite(result.eval["loss"])
    assert np.array_equal(stats.after[3], stats.after[2]) and not np.array_equal(stats.after[4], stats.after[3])
    assert int(model[1].num_batches_tracked) == 11   # 12 steps, one skipped
    assert np.isfinite(stats.after[12]).all()


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_keras_skip_mode_leaves_batchnorm_statistics_as_they_were(mode):
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(), keras.layers.Dense(4)])
    adapter = make_adapter(model, keras.optimizers.Adam(0.01), LOGITS, mode=mode)
    stats = Buffers(lambda m: m.layers[1].moving_mean.numpy())
    result = Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1, nonfinite="skip")), [stats],
                     process=KerasLocal()).fit((with_nan_rows(9), Y), (X_EVAL, Y_EVAL))
    assert result.skipped_steps == 1 and math.isfinite(result.eval["loss"])
    assert np.array_equal(stats.after[3], stats.after[2]) and not np.array_equal(stats.after[4], stats.after[3])
    assert np.isfinite(stats.after[12]).all()


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_keras_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, mode):
    with pytest.raises(StoppedOnEveryRank) as error:
        keras_fit(mode, x=with_nan_rows(21), epochs=1, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert re.match(r"^non-finite loss \(nan on rank 0\) at epoch 1, step 6; stopped on every rank .*the last good "
                    r"checkpoint is .*ckpt-00000001\.bin$", str(error.value)), str(error.value)
    _, manifest = CheckpointStore(str(tmp_path)).load_latest()
    assert manifest["global_step"] == 4


def inf_when_label_is_99_torch(outputs, targets):
    """Cross entropy plus a constant +inf for a batch holding label 99: the loss is Inf, its gradient finite."""
    clean = torch.where(targets == 99, torch.zeros_like(targets), targets)
    return torch.nn.functional.cross_entropy(outputs, clean) + (float("inf") if bool((targets == 99).any()) else 0.0)


def inf_when_label_is_99_keras(y_true, y_pred):
    y_true = tf.cast(y_true, tf.int32)
    clean = tf.where(tf.equal(y_true, 99), tf.zeros_like(y_true), y_true)
    flag = tf.reduce_any(tf.equal(y_true, 99))
    return LOGITS(clean, y_pred) + tf.stop_gradient(tf.where(flag, float("inf"), 0.0))


@pytest.mark.parametrize("framework", ["torch", "loop", "fit"])
def test_an_inf_loss_with_finite_gradients_is_caught_through_the_gradients(framework):
    """Only the loss is non-finite: the adapter folds it into the gradients it averages (so at N workers the
    other ranks learn it from the allreduce), and the step is skipped."""
    y = Y.copy()
    y[13] = 99    # step 4
    if framework == "torch":
        with pytest.raises(StoppedOnEveryRank, match=r"^non-finite loss \(inf on rank 0\) at epoch 1, step 4;"):
            torch_fit(y=y, loss_fn=inf_when_label_is_99_torch, epochs=1, eval_data=None)
        result, _, _ = torch_fit(y=y, loss_fn=inf_when_label_is_99_torch, epochs=1, eval_data=None, nonfinite="skip")
    else:
        with pytest.raises(StoppedOnEveryRank, match=r"^non-finite loss \(inf on rank 0\) at epoch 1, step 4;"):
            keras_fit(framework, y=y, loss=inf_when_label_is_99_keras, epochs=1, eval_data=None)
        result, _, _ = keras_fit(framework, y=y, loss=inf_when_label_is_99_keras, epochs=1, eval_data=None,
                                 nonfinite="skip")
    assert result.skipped_steps == 1


def test_an_inf_loss_is_caught_when_the_optimizer_steps_only_some_parameters():
    """The first layer is trainable but not the optimizer's: the NaN that carries a rank's Inf loss into the
    averaged gradients must land in a parameter the optimizer steps (whose norm is checked)."""
    model = torch_model()
    y = Y.copy()
    y[13] = 99    # step 4
    adapter = TorchAdapter(model, torch.optim.SGD(model[2].parameters(), lr=0.05), inf_when_label_is_99_torch)
    with pytest.raises(StoppedOnEveryRank, match=r"^non-finite loss \(inf on rank 0\) at epoch 1, step 4;"):
        Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1)), process=LocalProcess()).fit((X, y))


def test_nonfinite_off_trains_as_before():
    result, model, _ = torch_fit(x=with_nan_rows(9), epochs=1, nonfinite="off", eval_data=None)
    assert result.skipped_steps == 0 and not np.isfinite(flat_torch(model)).all()


# ---- several workers: rank 1 alone has a NaN loss ---------------------------------------------------------
NAN_WORKER = os.path.join(WORKERS, "nan_loss.py")
DIGITS = os.path.join(REPO, "examples", "torch_digits.py")


def test_two_workers_stop_in_the_same_step_when_only_rank_1_has_a_nan_loss(tmp_path):
    """Through ``hvdkit launch`` as a user runs it: exit 2 (the workers' code), every rank's one line the same."""
    ckpt = tmp_path / "ckpt"
    hvdkit = os.path.join(os.path.dirname(sys.executable), "hvdkit")
    result = run([hvdkit, "launch", "-np", "2", NAN_WORKER, DIGITS, "--epochs", "2", "--no-progress",
                  "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", "--metrics-json", str(tmp_path / "m.json")],
                 timeout=180, env={"HVDKIT_NAN": "1:10"})
    output = result.stdout + result.stderr
    assert result.returncode == 2, explain(result)
    assert re.search(r"^hvdkit: error: rank \d failed first \(exit 2\): hvdkit: error: non-finite loss \(nan on "
                     r"rank 1\) at epoch 1, step 10;", output, re.M), explain(result)
    lines = {rank: re.findall(rf"\[(?:\d+,)?{rank}\]<stderr>:hvdkit: error: (.*)", output) for rank in (0, 1)}
    assert len(lines[0]) == 1 and lines[0] == lines[1], explain(result)   # the same one line on every rank
    assert re.match(r"non-finite loss \(nan on rank 1\) at epoch 1, step 10; stopped on every rank .*the last good "
                    r"checkpoint is .*ckpt-00000001\.bin$", lines[0][0]), lines[0][0]
    _, manifest = CheckpointStore(str(ckpt)).load_latest()
    assert manifest["global_step"] == 8 and not (tmp_path / "m.json").exists()
    assert "failed" not in lines[0][0]   # not "rank R failed": nobody failed alone


def test_two_workers_skip_the_same_step_when_only_rank_1_has_a_nan_loss(tmp_path):
    """Rank 0's own loss is finite, yet it must skip step 10 as well: otherwise the ranks' parameters differ and
    the end-of-epoch divergence check fails the job."""
    metrics = tmp_path / "m.json"
    result = launch(NAN_WORKER, [DIGITS, "--epochs", "1", "--no-progress", "--nonfinite", "skip",
                                 "--metrics-json", str(metrics)], timeout=180, env={"HVDKIT_NAN": "1:10,12"})
    assert result.returncode == 0, explain(result)
    summary = json.loads(metrics.read_text())
    assert summary["skipped_steps"] == 2 and summary["epochs"] == 1 and summary["test_accuracy"] > 0.5
    assert len(re.findall(r"skipped step 1[02] \(epoch 1\) on every rank: non-finite loss \(nan on rank 1\)",
                          result.stdout + result.stderr)) == 2, explain(result)


def test_adasum_stops_after_the_fact_and_refuses_skip():
    """Adasum applies the combined update inside the step: a non-finite one is caught in the parameters right
    after, and the line says it was applied; skipping it is impossible, so "skip" is refused up front."""
    def fit(nonfinite):
        model = torch_model()
        adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.functional.cross_entropy,
                               op="adasum")
        return Trainer(adapter, TrainConfig(**dict(QUIET, epochs=1, nonfinite=nonfinite)),
                       process=LocalProcess()).fit((with_nan_rows(9), Y))
    with pytest.raises(StoppedOnEveryRank, match=r"^non-finite .* at epoch 1, step 3; stopped on every rank after "
                                                 r"Adasum applied it"):
        fit("stop")
    with pytest.raises(HvdkitError, match="nonfinite='skip' needs op='average'"):
        fit("skip")
