"""Sharded optimizer (ZeRO stage 2, ``shard_optimizer``) for Keras 3: both adapters.

In one process (``hvdkit.keras.LocalProcess``): sharded runs against unsharded ones (variables, and the unsharded
view of the sharded state against the unsharded optimizer's variables), every elementwise optimizer, the LR applied
(schedule x factor, read where the update step receives it), a skipped non-finite step, checkpoints crossing between
sharded and unsharded runs, a rollback, the refusals. One launch at 2 and one at 3 workers
(tests/workers/zero_checks.py ``keras``): sharded == unsharded on every rank (also with fp16 compression of the
reduce-scatter), per-rank optimizer state ~1/N, and a sharded checkpoint written at 2 workers resumed at 2, at 3
and here at 1 (sharded and unsharded) reaching the variables of an uninterrupted run.
"""
import json
import shutil
import sys
import time

import numpy as np
import pytest

from hvdkit import HvdkitError, TrainConfig, Trainer
from hvdkit.cli import main

from fault_callbacks import RaiseOnce
from proc import WORKERS, explain, launch

sys.path.insert(0, WORKERS)
tf = pytest.importorskip("tensorflow")
from hvdkit.keras import LocalProcess  # noqa: E402
import keras  # noqa: E402
import zero_checks as zc  # noqa: E402
from lr_checks import LrProbe, mismatches  # noqa: E402

FEATURES = {"plain": dict(batch_size=4),
            "accumulation_clip_schedule": dict(batch_size=4, accumulation=2, clip_grad_norm=0.3, schedule=True)}


def local_fit(name, shard, **config):
    return zc.keras_fit(name, shard, process=LocalProcess(), **config)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---- one process -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features", sorted(FEATURES))
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_loop_sharded_equals_unsharded_in_one_process(name, features):
    plain_model, plain, _ = local_fit(name, False, **FEATURES[features])
    sharded_model, sharded, result = local_fit(name, True, **FEATURES[features])
    assert result.global_step == zc.steps(1, **FEATURES[features])
    assert max_diff(zc.keras_flat(plain_model), zc.keras_flat(sharded_model)) <= 1e-5
    assert max_diff(zc.keras_flat(plain_model), zc.keras_flat(zc.keras_model())) > 1e-2   # it trained
    # the unsharded view of the sharded state is the unsharded optimizer's variables, in the same order
    sharded.gather_state()
    want, got = [v.numpy() for v in plain.optimizer.variables], sharded._optimizer_arrays()
    assert [np.shape(a) for a in got] == [np.shape(a) for a in want] and len(got) > 2
    for i, (a, b) in enumerate(zip(got, want)):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-6), i
    # the user's optimizer: its iterations count the steps; it never built its (full-size) slots
    assert int(sharded.optimizer.iterations.numpy()) == result.global_step
    assert len(sharded.optimizer.variables) == 1 + (not FEATURES[features].get("schedule"))
    assert result.optimizer_state_bytes == sharded.optimizer_state_bytes() > 0


@pytest.mark.parametrize("name,features", [("adamw", "accumulation_clip_schedule"), ("sgd", "plain")])
def test_fit_sharded_equals_unsharded_in_one_process(name, features):
    plain_model, _, _ = local_fit(name, False, mode="fit", **FEATURES[features])
    sharded_model, sharded, result = local_fit(name, True, mode="fit", **FEATURES[features])
    assert result.global_step == zc.steps(1, **FEATURES[features])
    assert max_diff(zc.keras_flat(plain_model), zc.keras_flat(sharded_model)) <= 1e-5
    assert max_diff(zc.keras_flat(plain_model), zc.keras_flat(zc.keras_model())) > 1e-2
    assert int(sharded.optimizer.iterations.numpy()) == result.global_step
    assert not sharded.optimizer.built   # fit never built the user's optimizer either


OTHER_OPTIMIZERS = {
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "rmsprop_centered": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "adamax": lambda: keras.optimizers.Adamax(0.02),
    "nadam": lambda: keras.optimizers.Nadam(0.02),
    "lion": lambda: keras.optimizers.Lion(0.002),
    "adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "ftrl": lambda: keras.optimizers.Ftrl(0.05, l1_regularization_strength=1e-3, l2_shrinkage_regularization_strength=1e-3),
    "adam_amsgrad": lambda: keras.optimizers.Adam(0.02, amsgrad=True)}


@pytest.mark.parametrize("name", sorted(OTHER_OPTIMIZERS))
def test_every_elementwise_optimizer_shards_alike(name):
    finals = []
    for shard in (False, True):
        model = zc.keras_model()
        adapter = zc.keras_adapter("loop", model, OTHER_OPTIMIZERS[name]())
        Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4, epochs=1), shard_optimizer=shard),
                process=LocalProcess()).fit(zc.data())
        finals.append(zc.keras_flat(model))
    assert max_diff(finals[0], finals[1]) <= 1e-5
    assert max_diff(finals[0], zc.keras_flat(zc.keras_model())) > 1e-3


@pytest.mark.parametrize("mode,first,second", [("loop", True, False), ("fit", True, False), ("loop", True, True),
                                               ("loop", False, True)])
def test_a_second_fit_keeps_the_optimizer_state_sharded_or_not(mode, first, second):
    """Two fits of one adapter, each sharded or not: the second steps from the first's Adam state (a sharded fit
    before an unsharded one used to leave the user's optimizer with the state it had before)."""
    def two_fits(first, second, fresh_state=False):
        model = zc.keras_model()
        adapter = zc.keras_adapter(mode, model, zc.keras_optimizer_for("adam"))
        for i, shard in enumerate((first, second)):
            if fresh_state and i == 1:   # what dropping the state did: the second fit on a fresh Adam
                adapter = zc.keras_adapter(mode, model, zc.keras_optimizer_for("adam"))
            Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4, epochs=1), shard_optimizer=shard),
                    process=LocalProcess()).fit(zc.data())
        return zc.keras_flat(model)
    reference = two_fits(False, False)
    assert max_diff(two_fits(False, False, fresh_state=True), reference) > 1e-3   # the state matters here
    assert max_diff(two_fits(first, second), reference) <= 1e-5


def test_the_applied_lr_is_the_schedule_times_the_factor():
    """Read where the update step receives it (lr_checks.LrProbe, unchanged): schedule(step) x a factor ramped
    from 1 to 3 over 4 steps."""
    probe = LrProbe()
    zc.keras_fit("adam", True, process=LocalProcess(), schedule=True, batch_size=4, epochs=1,
                 lr_scaling=lambda size: 3.0, warmup_steps=4, callbacks=[probe])
    assert len(probe.records) == zc.steps(1, 4) // 2
    assert not mismatches(probe.records, lambda t: [0.02 * 0.7 ** (t // 2)], scaling=lambda size: 3.0, warmup=4)


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_a_skipped_nonfinite_step_is_skipped_alike(mode):
    finals = []
    for shard in (False, True):
        model, nan_in_step = zc.keras_model(), zc.KerasNanInStep(3)
        adapter = zc.keras_adapter(mode, model, zc.keras_optimizer_for("adam"), loss=nan_in_step)
        result = Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4), nonfinite="skip", shard_optimizer=shard),
                         [nan_in_step], process=LocalProcess()).fit(zc.data())
        assert result.skipped_steps == 1 and result.global_step == zc.steps(1, 4)
        assert int(adapter.optimizer.iterations.numpy()) == result.global_step   # a skipped step still counts
        finals.append(zc.keras_flat(model))
    assert max_diff(finals[0], finals[1]) <= 1e-5 and np.isfinite(finals[1]).all()


def uninterrupted_reference():
    """The checkpoint scenario's run, unsharded and in one go, at one worker on the same global batch."""
    model, _, result = zc.keras_checkpoint_run(1, None, shard=False, process=LocalProcess(), stop=False)
    assert result.global_step == zc.steps(1, zc.GLOBAL_BATCH)
    return zc.keras_flat(model)


def resume_run(directory, shard, stop=False):
    return zc.keras_checkpoint_run(1, str(directory), shard=shard, process=LocalProcess(), stop=stop)


@pytest.mark.parametrize("written,resumed", [(True, False), (False, True), (True, True)])
def test_checkpoints_cross_between_sharded_and_unsharded(tmp_path, written, resumed):
    _, _, stopped = resume_run(tmp_path, written, stop=True)
    assert stopped.global_step == zc.STOP_AT
    model, _, result = resume_run(tmp_path, resumed)
    assert result.resumed_from["global_step"] == zc.STOP_AT and result.global_step == zc.steps(1, zc.GLOBAL_BATCH)
    assert max_diff(zc.keras_flat(model), uninterrupted_reference()) <= 1e-5


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_best_checkpoints_are_sharded_and_merge_into_the_unsharded_runs(tmp_path, mode):
    """keep_best with a sharded optimizer: the best checkpoints are one shard plus rank 0's file, and each merges
    (hvdkit checkpoint merge) into the arrays the unsharded run keeps as its best: model and optimizer variables."""
    from hvdkit.checkpoint import BestStore
    kept = {}
    for shard in (True, False):
        directory = tmp_path / ("sharded" if shard else "plain")
        local_fit("adam", shard, mode=mode, batch_size=4, epochs=3, keep_best=2, monitor="loss",
                  checkpoint_dir=str(directory))
        kept[shard] = [(epoch, number) for _, epoch, number, _ in BestStore(str(directory / "best")).ranked()]
        assert len(kept[shard]) == 2
        assert len(list((directory / "best").glob("*.shard-*"))) == (2 if shard else 0)
    assert [e for e, _ in kept[True]] == [e for e, _ in kept[False]]
    for (epoch, sharded_number), (_, plain_number) in zip(kept[True], kept[False]):
        assert main(["checkpoint", "merge", str(tmp_path / "sharded" / "best"), str(tmp_path / f"merged-{epoch}"),
                     "--number", str(sharded_number)]) == 0
        merged = np.load(tmp_path / f"merged-{epoch}" / "ckpt-00000000.bin")
        plain = np.load(tmp_path / "plain" / "best" / f"ckpt-{plain_number:08d}.bin")
        arrays = [k for k in plain.files if k.startswith(("model/", "optimizer/"))]
        assert any(k.startswith("optimizer/") for k in arrays) and set(arrays) <= set(merged.files)
        assert max(max_diff(merged[k], plain[k]) for k in arrays) <= 1e-5, epoch


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_a_rollback_restores_the_sharded_state(tmp_path, mode):
    from horovod.common.exceptions import HorovodInternalError
    whole, _, _ = local_fit("adam", True, mode=mode, batch_size=4)
    crash = RaiseOnce(at=9, error=HorovodInternalError("peer lost (simulated)"))
    model = zc.keras_model()
    adapter = zc.keras_adapter(mode, model, zc.keras_optimizer_for("adam"))
    result = Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4), shard_optimizer=True, elastic=True,
                                          commit_every=4, checkpoint_dir=str(tmp_path)),
                     [crash], process=LocalProcess()).fit(zc.data())
    assert crash.fired and result.resets == 1 and result.global_step == zc.steps(1, 4)
    assert max_diff(zc.keras_flat(model), zc.keras_flat(whole)) == 0.0


REFUSED = {
    "clipnorm": (lambda: keras.optimizers.Adam(0.01, clipnorm=1.0), "clipnorm clips each variable by its own norm"),
    "global_clipnorm": (lambda: keras.optimizers.Adam(0.01, global_clipnorm=1.0), "use clip_grad_norm"),
    "use_ema": (lambda: keras.optimizers.Adam(0.01, use_ema=True), "use_ema keeps a moving average"),
    "accumulation_steps": (lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
                           "set TrainConfig.accumulation"),
    "loss_scale_factor": (lambda: keras.optimizers.Adam(0.01, loss_scale_factor=128.0), "loss_scale_factor"),
    "lamb": (lambda: keras.optimizers.Lamb(0.01), "not Lamb: .*trust ratio"),
    "adafactor": (lambda: keras.optimizers.Adafactor(0.01), "not Adafactor"),
    "loss_scale_optimizer": (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)),
                             "not LossScaleOptimizer")}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_misuse_is_refused_in_one_line(case):
    make, message = REFUSED[case]
    adapter = zc.keras_adapter("loop", zc.keras_model(), make())
    with pytest.raises(HvdkitError, match=f"shard_optimizer: .*{message}") as caught:
        Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4), shard_optimizer=True),
                process=LocalProcess()).fit(zc.data())
    assert "\n" not in str(caught.value)


def test_weight_decay_exclusions_by_name_are_refused():
    optimizer = keras.optimizers.AdamW(0.01, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    adapter = zc.keras_adapter("fit", zc.keras_model(), optimizer)
    with pytest.raises(HvdkitError, match="exclude_from_weight_decay picks variables by identity or name"):
        Trainer(adapter, TrainConfig(**dict(zc.QUIET, batch_size=4), shard_optimizer=True),
                process=LocalProcess()).fit(zc.data())


# ---- launched: 2 and 3 workers -----------------------------------------------------------------------------
# The 2-worker run is a launch of its own through tests/conftest.py's shared runs (``launch=``), so this module's
# tests run in their own lane, beside the shared TF launches rather than after them; the 3-worker one is started
# here: it resumes the 2-worker checkpoint, a path known only once that launch ended, while a shared run's arguments
# are fixed when the modules are collected.
SHARED_RUNS = {"zero-keras": dict(framework="tensorflow", launcher="horovodrun", np=2, order=50, launch="zero-keras",
                                  script="tests/workers/zero_checks.py",
                                  args=["keras", "{out}", "{out}/checkpoints"], timeout=300)}


def records(out, np_):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(np_)]


@pytest.fixture(scope="module")
def two_workers(shared_runs):
    out = shared_runs.get("zero-keras").out
    return records(out, 2), out / "checkpoints"


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory, two_workers):
    base = tmp_path_factory.mktemp("zero_keras_three_workers")
    (base / "out").mkdir()
    shutil.copytree(two_workers[1], base / "resume")   # the 2-worker checkpoint, resumed here at 3
    started = time.monotonic()
    result = launch("tests/workers/zero_checks.py",
                    ["keras", str(base / "out"), str(base / "checkpoints"), str(base / "resume")],
                    np=3, launcher="horovodrun", timeout=300)
    assert result.returncode == 0, explain(result)
    print(f"keras zero launch at 3 workers: {time.monotonic() - started:.1f} s")
    return records(base / "out", 3), base / "checkpoints"


@pytest.fixture(params=[2, 3])
def launched(request):
    return request.param, request.getfixturevalue({2: "two_workers", 3: "three_workers"}[request.param])[0]


def test_launched_sharded_equals_unsharded_on_every_rank(launched):
    size, records = launched
    for rank, record in enumerate(records):
        assert record["size"] == size and record["rank"] == rank
        for key, run in zc.KERAS_EQUAL_RUNS.items():
            got = record["equal"][key]
            assert got["steps"] == got["iterations"] == zc.steps(size, **run)
            assert got["max_diff"] <= 1e-5, (key, got)
            assert got["user_optimizer_variables"] <= 2   # iterations (and a float LR): no slots


def test_launched_nonfinite_on_one_rank_is_skipped_on_every_rank(two_workers):
    for record in two_workers[0]:   # rank 1's NaN reaches rank 0 through the norm's allreduce over the shards
        assert record["nonfinite"]["skipped"] == [1, 1] and record["nonfinite"]["finite"]
        assert record["nonfinite"]["max_diff"] <= 1e-5, record["nonfinite"]


def test_launched_optimizer_state_is_one_nth_per_rank(launched):
    size, records = launched
    for key, slots in (("loop_adam", 2), ("loop_sgd", 1)):   # slots per element: momentum, velocity; momentum
        unsharded = records[0]["equal"][key]["unsharded_bytes"]
        held = [record["equal"][key]["sharded_bytes"] for record in records]
        rounding = 4 * slots + 12   # one padding element per slot; iterations and the LR on every rank
        assert all(record["equal"][key]["unsharded_bytes"] == unsharded for record in records)
        assert max(held) <= unsharded / size + rounding, (key, held, unsharded)
        assert all(record["equal"][key]["result_bytes"] == max(held) for record in records)   # the largest


def test_launched_fp16_compression_applies_to_the_reduce_scatter(launched):
    """As torch's (tests/test_zero_torch.py), on the loop's Adam run: measured 0.0 apart and 4.8e-5 from float32
    at 2 workers, 7.6e-5 apart and 1.3e-4 from float32 at 3."""
    size, records = launched
    for record in records:
        fp16 = record["fp16"]
        assert fp16["sharded_vs_unsharded"] <= zc.FP16_TOLERANCE[size], fp16
        assert fp16["sharded_vs_fp32"] > 1e-5 and fp16["unsharded_vs_fp32"] > 1e-5, fp16


def test_a_checkpoint_written_at_two_workers_resumes_at_three(three_workers):
    """The 2-worker shards resharded over 3 ranks (the Embedding split differently) continue to the variables of
    an uninterrupted run."""
    reference = uninterrupted_reference()
    for record in three_workers[0]:
        resumed = record["resumed"]
        assert resumed["from_world"] == 2 and resumed["from_step"] == zc.STOP_AT
        assert resumed["steps"] == zc.steps(3, zc.GLOBAL_BATCH // 3)
        assert max_diff(resumed["params"], reference) <= 1e-5


def test_a_checkpoint_written_at_two_workers_resumes_there(two_workers):
    """Rank 0's loaded state cut into each rank's shard (an Embedding split across the two)."""
    reference = uninterrupted_reference()
    for record in two_workers[0]:
        assert record["resumed"]["from_step"] == zc.STOP_AT
        assert record["resumed"]["steps"] == zc.steps(2, zc.GLOBAL_BATCH // 2)
        assert max_diff(record["resumed"]["params"], reference) <= 1e-5


@pytest.mark.parametrize("shard", [True, False])
def test_a_checkpoint_written_at_two_workers_resumes_at_one(two_workers, tmp_path, shard):
    records, checkpoints = two_workers
    shutil.copytree(checkpoints, tmp_path / "resume")
    model, _, result = resume_run(tmp_path / "resume", shard)
    assert result.resumed_from["saved_world_size"] == 2 and result.global_step == zc.steps(1, zc.GLOBAL_BATCH)
    assert max_diff(zc.keras_flat(model), uninterrupted_reference()) <= 1e-5
    # and where it stopped, the 2 workers agreed with one process trained on the same global batches
    stopped, _, _ = resume_run(tmp_path / "alone", False, stop=True)
    for record in records:
        assert record["checkpoint"]["steps"] == zc.STOP_AT
        assert max_diff(record["checkpoint"]["params"], zc.keras_flat(stopped)) <= 1e-5


def test_the_two_worker_checkpoint_is_a_shard_per_rank_and_merges_into_a_plain_model(two_workers, tmp_path):
    records, checkpoints = two_workers
    manifest = zc.two_shard_manifest(checkpoints)
    slots = {row["key"] for row in manifest["shard_index"]["assemble"]}
    assert slots and not slots & set(np.load(checkpoints / manifest["file"]).files)   # no slot in rank 0's file

    assert main(["checkpoint", "merge", str(checkpoints), str(tmp_path / "merged")]) == 0
    merged = np.load(tmp_path / "merged" / "ckpt-00000000.bin")
    plain = zc.keras_model(batchnorm=False)
    for i, variable in enumerate(plain.variables):
        variable.assign(merged[f"model/{i}"])
    assert max_diff(zc.keras_flat(plain), records[0]["checkpoint"]["params"]) == 0
    # the optimizer's variables, merged from the two shards, are those of one process stopped at the same step
    _, alone, _ = resume_run(tmp_path / "alone", False, stop=True)
    expected = [v.numpy() for v in alone.optimizer.variables]
    assert len(expected) == sum(1 for k in merged.files if k.startswith("optimizer/"))
    for i, value in enumerate(expected):
        assert np.allclose(merged[f"optimizer/{i}"], value, rtol=1e-4, atol=1e-7), i
