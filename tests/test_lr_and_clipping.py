"""LR schedules composed with world-size scaling and warmup, and gradient clipping, torch and Keras.

The LR is read back from the framework at every step (tests/workers/lr_checks.py: a torch step pre-hook, the
LR Keras passes to its update step), never from the config, and compared with
``lr(step) = schedule(step) x factor(world size, step)``, the factor written out independently in lr_checks.
In one process (``LocalProcess``) the factor is a custom ``lr_scaling`` so that it is not 1; one launch at
2 workers checks linear scaling and clipping against one process trained on the whole batch.
"""
import json
import os
import sys

import numpy as np
import pytest

from hvdkit import HvdkitError, TrainConfig, Trainer
from fault_callbacks import RaiseOnce
from hvdkit.sharding import plan_epoch

from proc import REPO, WORKERS, explain, run

sys.path.insert(0, WORKERS)
import lr_checks  # noqa: E402
from lr_checks import LrProbe, mismatches  # noqa: E402

RNG = np.random.default_rng(11)
X = RNG.normal(size=(40, 6)).astype(np.float32)
Y = RNG.integers(0, 3, size=40).astype(np.int64)
STEPS = 10                    # per epoch: 40 samples, batch 4
QUIET = dict(progress_bar=False, batch_size=4, seed=0, epochs=2)
SCALED = dict(QUIET, lr_scaling=lambda world_size: 3.0, warmup_steps=5)   # factor 1.4, 1.8, ..., 3.0, 3.0, ...
CLIP = 0.05                   # below the gradients' global norm at every step (asserted in the references)


def factor(t):
    return lr_checks.world_factor(1, t, lambda w: 3.0, 5)




def lost_peer():
    from horovod.common.exceptions import HorovodInternalError
    return HorovodInternalError("peer lost (simulated)")


# ---- torch ---------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from hvdkit.torch import LocalProcess as TorchLocal, TorchAdapter  # noqa: E402

BASES = (0.1, 0.02)   # two param groups


def torch_setup(seed=5, interval="step", momentum=0.9):
    model, optimizer = lr_checks.torch_model_and_optimizer(seed, momentum)
    step_size = 3 if interval == "step" else 1
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.5) if interval else None
    return model, optimizer, scheduler


def torch_schedule(interval):
    per = 3 if interval == "step" else STEPS   # StepLR(3) stepped per step; StepLR(1) stepped per epoch
    return lambda t: [b * 0.5 ** (t // per) for b in BASES]


def torch_fit(interval="step", callbacks=(), seed=5, **config):
    model, optimizer, scheduler = torch_setup(seed, interval)
    probe = LrProbe()
    adapter = TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy, scheduler=scheduler,
                           scheduler_interval=interval or "step")
    result = Trainer(adapter, TrainConfig(**dict(SCALED, **config)), [probe, *callbacks], process=TorchLocal()).fit((X, Y))
    return result, probe.records, model, optimizer, scheduler


def torch_flat(model):
    return np.concatenate([t.detach().numpy().ravel() for t in model.state_dict().values()])


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_torch_lr_each_step_is_schedule_times_factor(interval):
    result, records, _, optimizer, scheduler = torch_fit(interval)
    assert [r["step"] for r in records] == list(range(1, 2 * STEPS + 1))
    assert not mismatches(records, torch_schedule(interval), lambda w: 3.0, 5)
    assert len({tuple(r["lr"]) for r in records}) >= 6   # the factor ramped and the schedule moved: both act
    # between steps the param groups hold the schedule's LR, never the factor's: the scheduler owns them
    after = torch_schedule(interval)(2 * STEPS)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(after, rel=1e-12)
    assert scheduler.get_last_lr() == pytest.approx(after, rel=1e-12)


def test_torch_without_a_scheduler_keeps_the_given_lr_and_scales_it():
    _, records, _, optimizer, _ = torch_fit(interval=None)
    assert not mismatches(records, lambda t: list(BASES), lambda w: 3.0, 5)
    assert [g["lr"] for g in optimizer.param_groups] == list(BASES)


@pytest.mark.parametrize("interval,stop", [("step", 13), ("epoch", 13), ("epoch", 10)])
def test_torch_schedule_continues_after_a_checkpoint_resume(tmp_path, interval, stop):
    _, whole, whole_model, _, _ = torch_fit(interval, checkpoint_dir=str(tmp_path / "a"))
    stopped, _, _, _, _ = torch_fit(interval, checkpoint_dir=str(tmp_path / "b"), stop_after_steps=stop)
    assert stopped.global_step == stop
    # a fresh model, optimizer and scheduler (at step 0): the schedule's place comes from the checkpoint
    resumed, records, model, _, scheduler = torch_fit(interval, seed=99, checkpoint_dir=str(tmp_path / "b"))
    assert resumed.resumed_from["global_step"] == stop
    assert [r["step"] for r in records] == list(range(stop + 1, 2 * STEPS + 1))
    assert [r["lr"] for r in records] == [r["lr"] for r in whole[stop:]]
    assert not mismatches(records, torch_schedule(interval), lambda w: 3.0, 5)
    assert np.abs(torch_flat(model) - torch_flat(whole_model)).max() == 0.0


def test_torch_elastic_rollback_restores_the_schedule():
    _, _, whole_model, _, _ = torch_fit("step")
    crash = RaiseOnce(at=8, error=lost_peer())
    result, records, model, _, _ = torch_fit("step", callbacks=[crash], elastic=True, commit_every=3)
    assert crash.fired and result.resets == 1
    assert [r["step"] for r in records] == list(range(1, 9)) + list(range(7, 2 * STEPS + 1))   # back to step 6
    assert not mismatches(records, torch_schedule("step"), lambda w: 3.0, 5)
    assert np.abs(torch_flat(model) - torch_flat(whole_model)).max() == 0.0


def torch_clip_reference(accumulation, batch=4, clip=CLIP, x=X, y=Y, seed=9, epochs=2):
    """One process, plain torch: the step's gradient (micro-batches weighted by their share), clipped."""
    model, optimizer = lr_checks.torch_model_and_optimizer(seed)
    norms = []
    for epoch in range(epochs):
        for step in plan_epoch(len(x), 0, 1, batch, 0, epoch, accumulation):
            optimizer.zero_grad()
            for ids in step.micro_batches:
                loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[ids])), torch.from_numpy(y[ids]))
                (loss * len(ids) / step.samples_in_step).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
    assert min(norms) > clip, norms   # clipping acted at every step
    return model


@pytest.mark.parametrize("accumulation", [1, 2])
def test_torch_clipping_matches_a_clipping_single_process(accumulation):
    def run(clip):
        model, optimizer = lr_checks.torch_model_and_optimizer(9)
        config = TrainConfig(**dict(QUIET, lr_scaling="none", clip_grad_norm=clip, accumulation=accumulation))
        Trainer(TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy), config,
                process=TorchLocal()).fit((X, Y))
        return torch_flat(model)
    reference = torch_flat(torch_clip_reference(accumulation))
    assert np.abs(run(CLIP) - reference).max() < 1e-6
    assert np.abs(run(None) - reference).max() > 1e-3   # without clipping: another result


def test_torch_misuse_is_refused_in_one_line(tmp_path):
    model, optimizer, _ = torch_setup()
    loss = torch.nn.functional.cross_entropy
    with pytest.raises(HvdkitError, match="ReduceLROnPlateau"):
        TorchAdapter(model, optimizer, loss, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))
    _, other, _ = torch_setup()
    with pytest.raises(HvdkitError, match="built on the optimizer"):
        TorchAdapter(model, optimizer, loss, scheduler=torch.optim.lr_scheduler.StepLR(other, 3))
    with pytest.raises(HvdkitError, match="scheduler_interval"):
        TorchAdapter(model, optimizer, loss, scheduler_interval="batch")
    with pytest.raises(HvdkitError, match="clip_grad_norm must be"):
        TrainConfig(clip_grad_norm=0.0).validate()
    with pytest.raises(HvdkitError, match="Adasum"):
        Trainer(TorchAdapter(model, optimizer, loss, op="adasum"), TrainConfig(**dict(QUIET, clip_grad_norm=1.0)),
                process=TorchLocal()).fit((X, Y))
    # a checkpoint written without a scheduler does not silently restart a schedule
    torch_fit(None, checkpoint_dir=str(tmp_path), epochs=1)
    with pytest.raises(HvdkitError, match="written without an LR scheduler"):
        torch_fit("step", checkpoint_dir=str(tmp_path))


# ---- Keras ----------------------------------------------------------------------------------------------
def keras_modules():
    pytest.importorskip("tensorflow")
    import keras
    import tensorflow as tf
    from hvdkit.keras import KerasAdapter, KerasFitAdapter, LocalProcess
    return keras, tf, KerasAdapter, KerasFitAdapter, LocalProcess


def keras_setup(schedule, seed=3, momentum=0.9):
    keras_modules()
    return lr_checks.keras_model_and_optimizer(seed, schedule, momentum)


def keras_schedule(schedule):
    return (lambda t: [0.1 * 0.5 ** (t // 3)]) if schedule else (lambda t: [0.1])


def keras_fit(mode, schedule=True, callbacks=(), seed=3, clip=None, **config):
    keras, tf, KerasAdapter, KerasFitAdapter, LocalProcess = keras_modules()
    model, optimizer = keras_setup(schedule, seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if mode == "fit":
        model.compile(optimizer=optimizer, loss=loss)
        adapter = KerasFitAdapter(model)
    else:
        adapter = KerasAdapter(model, optimizer, loss)
    probe = LrProbe()
    cfg = TrainConfig(**dict(SCALED, clip_grad_norm=clip, **config))
    result = Trainer(adapter, cfg, [probe, *callbacks], process=LocalProcess()).fit((X, Y))
    return result, probe.records, model, optimizer


def keras_flat(model):
    return np.concatenate([v.numpy().ravel() for v in model.variables])


@pytest.mark.parametrize("mode", ["loop", "fit"])
@pytest.mark.parametrize("schedule,accumulation", [(True, 1), (True, 2), (False, 1)],
                         ids=["schedule", "schedule-accumulation", "float-lr"])
def test_keras_lr_each_step_is_schedule_times_factor(mode, schedule, accumulation):
    result, records, _, optimizer = keras_fit(mode, schedule, accumulation=accumulation)
    steps = 2 * (STEPS // accumulation)
    assert result.global_step == steps and [r["step"] for r in records] == list(range(1, steps + 1))
    assert not mismatches(records, keras_schedule(schedule), lambda w: 3.0, 5)
    # outside the update step the optimizer shows the schedule's LR at its step count, unscaled
    assert int(optimizer.iterations.numpy()) == steps
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(keras_schedule(schedule)(steps)[0], rel=1e-6)


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_keras_schedule_continues_after_a_checkpoint_resume(tmp_path, mode):
    _, whole, whole_model, _ = keras_fit(mode, checkpoint_dir=str(tmp_path / "a"))
    keras_fit(mode, checkpoint_dir=str(tmp_path / "b"), stop_after_steps=13)
    resumed, records, model, optimizer = keras_fit(mode, seed=77, checkpoint_dir=str(tmp_path / "b"))
    assert resumed.resumed_from["global_step"] == 13
    assert [r["step"] for r in records] == list(range(14, 2 * STEPS + 1))
    assert not mismatches(records, keras_schedule(True), lambda w: 3.0, 5)
    assert [r["lr"] for r in records] == [r["lr"] for r in whole[13:]]
    assert np.abs(keras_flat(model) - keras_flat(whole_model)).max() == 0.0


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_keras_elastic_rollback_restores_the_step_count(mode):
    _, _, whole_model, _ = keras_fit(mode)
    crash = RaiseOnce(at=8, error=lost_peer())
    result, records, model, optimizer = keras_fit(mode, callbacks=[crash], elastic=True, commit_every=3)
    assert crash.fired and result.resets == 1
    assert [r["step"] for r in records] == list(range(1, 9)) + list(range(7, 2 * STEPS + 1))
    assert not mismatches(records, keras_schedule(True), lambda w: 3.0, 5)
    assert int(optimizer.iterations.numpy()) == 2 * STEPS
    assert np.abs(keras_flat(model) - keras_flat(whole_model)).max() < 1e-6


def keras_clip_reference(accumulation, batch=4, x=X, y=Y, epochs=2):
    """One process, plain Keras: the step's gradient (micro-batches weighted by their share), clipped."""
    keras, tf, *_ = keras_modules()
    model, optimizer = keras_setup(schedule=False)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    norms = []
    for epoch in range(epochs):
        for step in plan_epoch(len(x), 0, 1, batch, 0, epoch, accumulation):
            total = None
            for ids in step.micro_batches:
                with tf.GradientTape() as tape:
                    loss = loss_fn(y[ids], model(x[ids], training=True)) * (len(ids) / step.samples_in_step)
                grads = tape.gradient(loss, model.trainable_variables)
                total = grads if total is None else [a + b for a, b in zip(total, grads)]
            clipped, norm = tf.clip_by_global_norm(total, CLIP)
            norms.append(float(norm))
            optimizer.apply(clipped, model.trainable_variables)
    assert min(norms) > CLIP, norms
    return model


@pytest.mark.parametrize("mode", ["loop", "fit"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_keras_clipping_matches_a_clipping_single_process(mode, accumulation):
    reference = keras_flat(keras_clip_reference(accumulation))
    _, _, model, _ = keras_fit(mode, schedule=False, clip=CLIP, accumulation=accumulation, lr_scaling="none",
                               warmup_steps=0)
    assert np.abs(keras_flat(model) - reference).max() < 1e-6
    _, _, unclipped, _ = keras_fit(mode, schedule=False, accumulation=accumulation, lr_scaling="none", warmup_steps=0)
    assert np.abs(keras_flat(unclipped) - reference).max() > 1e-3


# ---- the example flags -----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_example_flags_build_the_documented_schedule(schedule):
    from hvdkit.scripting import (config_from_args, keras_learning_rate, scheduled_lr, torch_lr_scheduler,
                                  training_parser)
    args = training_parser("t", epochs=1, batch_size=4, lr=0.2).parse_args(
        ["--clip-grad-norm", "0.5", "--lr-schedule", schedule, "--lr-decay-steps", "4"])
    assert config_from_args(args).clip_grad_norm == 0.5
    expected = [scheduled_lr(schedule, 0.2, 4, t) for t in range(10)]
    assert expected[0] == 0.2 and expected[5] < 0.2
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=args.lr)
    scheduler, seen = torch_lr_scheduler(args, optimizer), []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    keras_lr = keras_learning_rate(args)
    assert [float(keras_lr(t)) for t in range(10)] == pytest.approx(expected, rel=1e-6, abs=1e-7)
    none = training_parser("t", epochs=1, batch_size=4, lr=0.2).parse_args([])
    assert torch_lr_scheduler(none, optimizer) is None and keras_learning_rate(none) == 0.2
    assert config_from_args(none).clip_grad_norm is None


def test_optimizer_flag_builds_what_it_names_in_both_frameworks():
    """--optimizer read back from the optimizers built: class, LR, momentum, weight decay; a bad name is one line."""
    import keras
    from hvdkit.scripting import keras_optimizer, optimizer_flag, torch_optimizer, training_parser

    def parse(*argv):
        parser = training_parser("t", epochs=1, batch_size=4, lr=0.2)
        optimizer_flag(parser)
        return parser.parse_args(list(argv))
    params = list(torch.nn.Linear(2, 2).parameters())
    built = {name: (torch_optimizer(parse("--optimizer", name, "--lr", "0.003"), params),
                    keras_optimizer(parse("--optimizer", name, "--lr", "0.003"))) for name in ("sgd", "adam", "adamw")}
    assert [type(t).__name__ for t, _ in built.values()] == ["SGD", "Adam", "AdamW"]
    assert [type(k).__name__ for _, k in built.values()] == ["SGD", "Adam", "AdamW"]
    assert all(t.param_groups[0]["lr"] == 0.003 and float(k.learning_rate) == pytest.approx(0.003)
               for t, k in built.values())
    assert built["sgd"][0].param_groups[0]["momentum"] == 0.9 and float(built["sgd"][1].momentum) == pytest.approx(0.9)
    assert built["adamw"][0].param_groups[0]["weight_decay"] == 0.01 and built["adamw"][1].weight_decay == 0.01
    assert type(torch_optimizer(parse(), params)).__name__ == "SGD"   # the examples' default is unchanged
    with pytest.raises(SystemExit):
        parse("--optimizer", "lamb")


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_examples_apply_the_schedule_flags(tmp_path, framework):
    """An example run with the flags (one process, no launcher) under the probe an elastic test can use too."""
    from hvdkit.scripting import scheduled_lr
    flags = ["--epochs", "2", "--limit-train", "160", "--batch-size", "32", "--lr-schedule", "cosine",
             "--lr-decay-steps", "7", "--warmup-steps", "3", "--clip-grad-norm", "1.0", "--no-progress"]
    result = run([sys.executable, os.path.join(WORKERS, "lr_checks.py"), "run", str(tmp_path / "lr"),
                  os.path.join(REPO, "examples", f"{framework}_digits.py"), *flags], timeout=240)
    assert result.returncode == 0, explain(result)
    records = lr_checks.read_log(str(tmp_path / "lr"))
    assert [r["step"] for r in records] == list(range(1, 11)) and {r["size"] for r in records} == {1}
    assert not mismatches(records, lambda t: [scheduled_lr("cosine", 0.05, 7, t)], "linear", 3)
    assert records[0]["lr"][0] == pytest.approx(0.05) and records[-1]["lr"][0] == pytest.approx(0.0, abs=1e-9)


# ---- 2 workers: one run per framework, in its framework's shared launch (tests/conftest.py) -------------------
SHARED_RUNS = {"lr-torch": dict(framework="torch", launcher="horovodrun", np=2, order=20,
                                script="tests/workers/lr_checks.py", args=["torch", "{out}"], timeout=300),
               "lr-keras": dict(framework="tensorflow", launcher="mpirun", np=2, order=20,
                                script="tests/workers/lr_checks.py", args=["keras", "{out}"], timeout=300)}


def two_worker_records(shared_runs, name):
    out = shared_runs.get(name).out
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def two_workers(shared_runs):
    return two_worker_records(shared_runs, "lr-torch")


@pytest.fixture(scope="module")
def two_keras_workers(shared_runs):
    keras_modules()
    return two_worker_records(shared_runs, "lr-keras")


def test_two_workers_lr_is_schedule_times_linear_factor(two_workers):
    steps = 2 * 7   # 52 samples over 2 workers x batch 4: 7 steps per epoch
    for rank, record in enumerate(two_workers):
        assert record["size"] == 2 and record["rank"] == rank and record["steps"] == steps
        for interval, per in (("step", 3), ("epoch", 7)):
            records = record[f"lr_{interval}"]
            assert [r["step"] for r in records] == list(range(1, steps + 1)) and {r["size"] for r in records} == {2}
            schedule = lambda t, per=per: [b * 0.5 ** (t // per) for b in lr_checks.BASE_LRS]  # noqa: E731
            assert not mismatches(records, schedule, "linear", 5), interval
            assert records[-1]["lr"] == pytest.approx([2 * lr for lr in schedule(steps - 1)])   # x2 after warmup
            assert record[f"lr_{interval}_between_steps"] == pytest.approx(schedule(steps))
    assert [r["lr"] for r in two_workers[0]["lr_step"]] == [r["lr"] for r in two_workers[1]["lr_step"]]
    print(f"torch 2 workers: largest relative LR error {worst_lr_error(two_workers, ('lr_step', 'lr_epoch'), 5):.1e}")


def worst_lr_error(records, keys, warmup):
    """The largest |LR used - formula| / formula over every step, rank and schedule of ``keys`` (for the note)."""
    worst = 0.0
    for record in records:
        for key in keys:
            per = 7 if key == "lr_epoch" else 3
            for r in record[key]:
                t = r["step"] - 1
                factor = lr_checks.world_factor(r["size"], t, "linear", warmup)
                bases = lr_checks.BASE_LRS if record["backend"] == "torch" else (0.1,)
                for got, base in zip(r["lr"], bases):
                    expected = base * 0.5 ** (t // per) * factor
                    worst = max(worst, abs(got - expected) / expected)
    return worst


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_workers_clip_like_one_process_on_the_whole_batch(two_workers, accumulation):
    x, y = lr_checks.data()
    reference = torch_clip_reference(accumulation, batch=2 * lr_checks.BATCH, clip=lr_checks.CLIP, x=x, y=y,
                                     epochs=lr_checks.EPOCHS)
    expected = torch_flat(reference)
    for record in two_workers:
        got = np.concatenate([np.asarray(t) for t in record[f"clip_acc{accumulation}"]])
        assert np.abs(got - expected).max() < 1e-6
    assert two_workers[0][f"clip_acc{accumulation}"] == two_workers[1][f"clip_acc{accumulation}"]


def test_two_keras_workers_lr_is_schedule_times_linear_factor(two_keras_workers):
    steps = 2 * 7
    for rank, record in enumerate(two_keras_workers):
        assert record["size"] == 2 and record["rank"] == rank and record["steps"] == steps
        for mode in ("loop", "fit"):
            records = record[f"lr_{mode}"]
            assert [r["step"] for r in records] == list(range(1, steps + 1)) and {r["size"] for r in records} == {2}
            assert not mismatches(records, keras_schedule(True), "linear", 5), mode
            assert records[-1]["lr"] == pytest.approx([2 * 0.1 * 0.5 ** ((steps - 1) // 3)], rel=1e-6)
    assert two_keras_workers[0]["lr_fit"] == [dict(r, rank=0) for r in two_keras_workers[1]["lr_fit"]]
    print(f"keras 2 workers: largest relative LR error {worst_lr_error(two_keras_workers, ('lr_loop', 'lr_fit'), 5):.1e}")


@pytest.mark.parametrize("mode, accumulation", [("loop", 1), ("fit", 2)])
def test_two_keras_workers_clip_like_one_process_on_the_whole_batch(two_keras_workers, mode, accumulation):
    x, y = lr_checks.data()
    reference = keras_clip_reference(accumulation, batch=2 * lr_checks.BATCH, x=x, y=y, epochs=lr_checks.EPOCHS)
    expected = np.concatenate([v.numpy().ravel() for v in reference.trainable_variables])
    for record in two_keras_workers:
        got = np.concatenate([np.asarray(t) for t in record[f"clip_{mode}_acc{accumulation}"]])
        assert np.abs(got - expected).max() < 1e-6
    assert two_keras_workers[0][f"clip_{mode}_acc{accumulation}"] == two_keras_workers[1][f"clip_{mode}_acc{accumulation}"]


def test_two_keras_workers_stop_together_on_rank_1s_inf_loss(two_keras_workers):
    """Rank 0's own losses are finite: it learns of rank 1's Inf through the averaged gradients, in that step."""
    lines = [record["nonfinite_loop"].get("stopped") for record in two_keras_workers]
    assert lines[0] == lines[1] and lines[0] is not None, lines
    assert lines[0].startswith(f"non-finite loss (inf on rank 1) at epoch 1, step {lr_checks.BAD_STEP}; stopped on "
                               "every rank"), lines[0]


def test_two_keras_workers_skip_rank_1s_inf_step_together(two_keras_workers):
    runs = [record["nonfinite_fit"] for record in two_keras_workers]
    for run_ in runs:
        assert (run_["skipped"], run_["steps"]) == (1, 7) and np.isfinite(run_["loss"]), run_
    assert runs[0]["params"] == runs[1]["params"]   # the same update skipped on both ranks


# ---- 2 workers: metrics over unequal shares, and the non-finite guard with sparse gradients ----------------
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_two_workers_metrics_over_an_odd_evaluation_set_equal_numpy_over_the_whole_set(framework, shared_runs):
    """23 samples: 12 and 11 per rank, last batches short; a padded or duplicated sample would shift every value."""
    if framework == "keras":
        keras_modules()   # skips without TensorFlow
    records = two_worker_records(shared_runs, "lr-torch" if framework == "torch" else "lr-keras")
    for record in records:
        reported, expected = record["metrics_odd"]["reported"], record["metrics_odd"]["expected"]
        assert reported["samples"] == 23
        assert round(reported["accuracy"] * 23) == round(expected["accuracy"] * 23)
        assert round(reported["top2"] * 23) == round(expected["top2"] * 23)
        assert reported["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert records[0]["metrics_odd"]["reported"] == records[1]["metrics_odd"]["reported"]


def test_two_workers_inf_loss_on_rank_1_with_a_sparse_embedding_stops_and_skips_together(two_workers):
    """Only rank 1's loss is Inf (its gradients finite); the model's first parameter is a sparse embedding, so the
    NaN carrying the verdict must keep every rank's gradient sparse or the ranks' collectives differ (a hang)."""
    lines = [record["sparse_stop"].get("stopped") for record in two_workers]
    assert lines[0] == lines[1] and lines[0] is not None, lines
    assert lines[0].startswith(f"non-finite loss (inf on rank 1) at epoch 1, step {lr_checks.BAD_STEP}; stopped on "
                               "every rank"), lines[0]
    skipped = [record["sparse_skip"] for record in two_workers]
    for run_ in skipped:
        assert (run_.get("skipped"), run_.get("steps")) == (1, 7), run_
    assert skipped[0]["params"] == skipped[1]["params"]
