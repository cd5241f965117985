"""Elastic training on one machine ('localhost' and '127.0.0.1' are two hosts to Horovod), torch and Keras.

Each job runs an example script (Keras also fed by tf.data) under an elastic horovodrun whose host discovery
reads a hosts file the test edits; audit records (steps as they start, rollbacks as markers) prove every sample
of every epoch was trained exactly once. Kills and resizes happen at known steps: the workers wait at gates
(tests/workers/gated.py) after step N while the test acts, so the commit a job resizes at or rolls back to is
known exactly, and is chosen mid-epoch.

Two jobs per framework, each driven once by a module-scoped fixture and read by several tests (a launch costs
more than anything it checks):
- ``resized``: starts on one host; a host is added at step 20 (epoch 1), then removed at step 70 (epoch 2); 3
  epochs.
- ``killed``: starts on two hosts; one worker is SIGKILLed mid-epoch 2 (the survivor rolls back and goes on
  alone), then the whole job is killed, its newest durable commit damaged, and a new job on two hosts resumes
  from the commit before it and finishes (15 epochs: the accuracy bar of a run without failures applies).
tf.data inputs (TFStream) are re-split mid-epoch too: Keras fit for the joins and leaves, the loop for the kills
and the restart.

Steps at batch 16 and --commit-every 5 (1437 samples): one worker trains 90 steps per epoch, two 45; at batch 32
two workers train 23 (epoch 2 is steps 24-46). A commit is made every 5th step and at each epoch end.
"""
import json
import os
import re
import signal
import sys
import time
from types import SimpleNamespace

import pytest

from elastic_harness import ElasticJob
from hvdkit.audit import check
from hvdkit.scripting import scheduled_lr
from proc import WORKERS

sys.path.insert(0, WORKERS)
import lr_checks  # noqa: E402  (tests/workers)

FRAMEWORKS = ["torch", "tensorflow"]
TRAIN_SAMPLES = 1437
COMMON = ["--batch-size", "16", "--commit-every", "5"]
BOTH, ONE = ["localhost:1", "127.0.0.1:1"], ["localhost:1"]
BOTH_HOSTS = ["localhost", "127.0.0.1"]


def outcome(job, epochs: int):
    """What a finished job left behind (nothing asserted here: each test asserts its part)."""
    rc = job.finish()
    metrics = None
    if os.path.exists(job.metrics):
        with open(job.metrics) as f:
            metrics = json.load(f)
    return SimpleNamespace(rc=rc, output=job.output(), resets=job.resets(), metrics=metrics,
                           audit=check(job.audit_dir, TRAIN_SAMPLES, epochs))


def trained_exactly_once(result, world_sizes_seen, epochs: int):
    assert result.rc == 0, result.output[-5000:]
    report = result.audit
    assert report["ok"], report["problems"]
    seen = {w for ws in report["world_sizes"].values() for w in ws}
    assert seen == world_sizes_seen, report
    metrics = result.metrics
    assert metrics["epochs"] == epochs and metrics["train_samples_per_epoch"] == TRAIN_SAMPLES
    return metrics


def resize_at_gate(job, step, hosts_before, hosts_after):
    """With the workers held after ``step`` (a multiple of --commit-every), edit the hosts file, wait until
    horovodrun has told rank 0, release: the resize happens at the commit of that step."""
    job.wait_gate([h.split(":")[0] for h in hosts_before], step=step)
    job.change_hosts(hosts_after)
    job.release(step)


# ---- one job per framework: a host added at step 20, removed at step 70 ---------------------------------------
# One worker (batch 16) to step 20 = sample 320 of epoch 1; two workers (32 per step) deal the other 1117 samples
# in 35 steps: epoch 1 ends at step 55, and step 70 is sample 15 x 32 = 480 of epoch 2. Epoch 3 runs on one worker
# from its start (no accuracy is asserted here: 3 epochs are enough for every check).
JOIN_AT, LEAVE_AT, RESIZED_EPOCHS = 20, 70, 3


@pytest.fixture(scope="module", params=FRAMEWORKS + ["tfdata"])
def resized(request, tmp_path_factory):
    framework = request.param
    tmp = str(tmp_path_factory.mktemp(f"resized-{framework}"))
    lr_log = os.path.join(tmp, "lr")
    schedule = ["--lr", "0.05", "--lr-schedule", "step", "--lr-decay-steps", "30"]   # x0.1 every 30 steps
    # the Keras job (model.fit) also shards its optimizer: each resize re-cuts the SGD momentum in memory over the
    # new workers and retraces the step (the torch sharded job: tests/test_zero_elastic.py)
    shard = ["--shard-optimizer"] if framework == "tensorflow" else []
    job = ElasticJob(tmp, framework, ONE, np=1, extra=["--epochs", str(RESIZED_EPOCHS)] + COMMON + schedule + shard,
                     gate_step=[JOIN_AT, LEAVE_AT], env={"HVDKIT_LR_LOG": lr_log})
    try:
        resize_at_gate(job, JOIN_AT, ONE, BOTH)
        resize_at_gate(job, LEAVE_AT, BOTH, ONE)
        result = outcome(job, RESIZED_EPOCHS)
    finally:
        job.kill()
    result.framework, result.lr_records = framework, lr_checks.read_log(lr_log)
    return result


def test_resized_job_trains_every_sample_exactly_once(resized):
    metrics = trained_exactly_once(resized, {1, 2}, RESIZED_EPOCHS)
    assert metrics["world_size"] == 1 and metrics["resets"] >= 2
    if resized.framework == "tensorflow":   # sharded: SGD's momentum, one float32 per parameter, on 1 worker again
        assert metrics["optimizer_state_bytes"] >= 4 * (64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10), metrics


def test_host_added_mid_training(resized):
    assert "workers 1 -> 2 (joined: 127.0.0.1/0" in resized.output
    reset = resized.resets[0]   # step 20 of epoch 1 (90 steps on one worker): a stream is re-dealt mid-epoch
    assert (reset["from"], reset["to"], reset["epoch"], reset["step"]) == (1, 2, 1, JOIN_AT), reset
    assert reset["sample"] == JOIN_AT * 16, reset
    assert not reset["rolled_back"]


def test_host_removed_mid_training(resized):
    assert "left: 127.0.0.1/0" in resized.output
    reset = resized.resets[1]   # step 70: the 15th step of epoch 2 on two workers
    assert (reset["from"], reset["to"], reset["epoch"], reset["step"]) == (2, 1, 2, LEAVE_AT), reset
    assert reset["sample"] == (LEAVE_AT - 55) * 32, reset
    assert not reset["rolled_back"]


def test_lr_follows_the_schedule_times_the_world_size_across_resizes(resized):
    # the LR each step applied, read from the optimizer: the schedule x the world size at that step; each resize
    # changes the factor and does not restart the schedule (a restart at step 20 would give 0.1 instead of 0.01
    # from step 31)
    records = resized.lr_records
    assert {r["size"] for r in records} == {1, 2}
    assert {r["step"] for r in records if r["size"] == 2} >= {JOIN_AT + 1, LEAVE_AT}
    assert {r["step"] for r in records if r["size"] == 1} >= {JOIN_AT, LEAVE_AT + 1}
    assert not lr_checks.mismatches(records, lambda t: [scheduled_lr("step", 0.05, 30, t)], "linear", 0)


# ---- one job pair per framework: a worker killed, then the whole job; a restart from a durable commit ----------
# The example's batch (32: epoch 2 is steps 24-46 on two workers) is killed after step 28, a stream with batch 16
# (epoch 2 is steps 46-90; 0.983 without failures) after step 52: both roll back to the commit 3 and 2 steps
# before, mid-epoch 2, and the rest of the epoch is re-dealt to the survivor. The survivor is held again after
# step 57 (67), every commit durable: the newest checkpoint is step 55's (65's) and the one before it, which the
# restart on two workers falls back to once the newest is damaged, step 50's (60's).
KILLED_EPOCHS = 15


@pytest.fixture(scope="module", params=FRAMEWORKS + ["tfdata-loop"])
def killed(request, tmp_path_factory):
    framework = request.param
    stream = framework.startswith("tfdata")
    tmp = str(tmp_path_factory.mktemp(f"killed-{framework}"))
    extra = ["--epochs", str(KILLED_EPOCHS), "--commit-every", "5"] + (["--batch-size", "16"] if stream else [])
    kill_at, stop_at = (52, 67) if stream else (28, 57)
    # torch: the whole job ends by its last worker's SIGKILL (horovodrun must end by itself, not hang; a short
    # elastic timeout bounds its wait for hosts), the others by killing the job
    every_worker = framework == "torch"
    first = ElasticJob(tmp, framework, BOTH, np=2, extra=extra, tag="first", gate_step=[kill_at, stop_at],
                       timeout=10 if every_worker else 30)
    second = None
    try:
        victim = first.wait_gate(BOTH_HOSTS, step=kill_at)["127.0.0.1"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        first.release(kill_at)
        first.wait_for(lambda: first.newest_commit_world() == 1, "a commit by the survivor after the kill")
        print(f"{framework}: {time.time() - killed_at:.2f} s from SIGKILL to the next committed step")
        survivor = first.wait_gate(["localhost"], step=stop_at)["localhost"]
        if every_worker:
            os.kill(survivor, signal.SIGKILL)
            ended = time.time()
            first_rc = first.finish(timeout=120)
            print(f"{framework}: horovodrun exited {first_rc} {time.time() - ended:.1f} s after its last worker was "
                  "killed")
        else:
            first.kill()
            first_rc = None
        first.kill()   # nothing of the first job may outlive it (its marker is the second job's too)
        manifests = first.manifests()
        first_output, rollbacks = first.output(), [r for r in first.resets() if r["rolled_back"]]
        newest = manifests[-1]
        with open(newest["bin_path"], "r+b") as f:                   # its newest durable commit damaged
            f.truncate(50)
        second = ElasticJob(tmp, framework, BOTH, np=2, extra=extra, tag="second")
        result = outcome(second, KILLED_EPOCHS)
    finally:
        first.kill()
        if second is not None:
            second.kill()
    result.framework, result.stream, result.first_rc = framework, stream, first_rc
    result.first_output, result.rollbacks, result.manifests = first_output, rollbacks, manifests
    result.kill_at, result.stop_at = kill_at, stop_at
    return result


def test_worker_killed_mid_epoch_rolls_back_and_finishes(killed):
    commit, global_batch, epoch_start = (50, 32, 45) if killed.stream else (25, 64, 23)   # epoch_start: epoch 1's end
    rollbacks = killed.rollbacks
    assert rollbacks, killed.first_output[-3000:]
    assert (rollbacks[0]["from"], rollbacks[0]["to"], rollbacks[0]["epoch"], rollbacks[0]["step"]) == \
        (2, 1, 2, commit), rollbacks[0]
    assert rollbacks[0]["sample"] == (commit - epoch_start) * global_batch, rollbacks[0]
    # over both jobs (the restart resumed the first one's commit): every sample once, and the accuracy bar
    metrics = trained_exactly_once(killed, {1, 2}, KILLED_EPOCHS)
    assert metrics["test_accuracy"] >= 0.95          # the bar a run without failures meets
    assert metrics["test_samples"] == 360 and metrics["world_size"] == 2


def test_every_worker_killed_ends_the_job_without_hanging(killed):
    if killed.framework != "torch":
        pytest.skip("the torch job ends by its last worker's SIGKILL; the others are killed whole")
    assert killed.first_rc not in (None, 0), killed.first_output[-3000:]


def test_whole_job_restarted_on_other_workers_resumes_from_last_good_durable_commit(killed):
    # every commit durable: the newest checkpoint was the step before the gate's last multiple of 5, and the
    # one before it is what the restart falls back to
    *_, previous, newest = killed.manifests
    expected = (killed.stop_at // 5 * 5 - 5, killed.stop_at // 5 * 5)
    assert (previous["global_step"], newest["global_step"]) == expected, (previous, newest)
    assert previous["world_size"] == newest["world_size"] == 1
    out = killed.output
    assert f"{os.path.basename(newest['bin_path'])} is corrupt" in out, out[-3000:]
    resumed = re.search(r"resumed from (ckpt-\S+): epoch (\d+), sample (\d+) of 1437, step (\d+) .*"
                        r"\(written by 1 workers, now 2\)", out)
    assert resumed, out[-3000:]
    assert resumed.group(1) == os.path.basename(previous["bin_path"]), resumed.group(0)
    # after the rollback the survivor trained the rest of epoch 2 alone: batch 16 (stream) or 32 per step
    commit, sample, batch = (50, 160, 16) if killed.stream else (25, 128, 32)
    step = previous["global_step"]
    assert resumed.groups()[1:] == ("2", str(sample + (step - commit) * batch), str(step)), resumed.group(0)


# ---- jobs that cannot go on ----------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_worker_failing_ends_the_job_with_a_clear_error(elastic_job, framework):
    job = elastic_job(framework, BOTH, np=2, extra=["--batch-size", "0"], timeout=10)
    assert job.finish(timeout=120) != 0
    errors = [l for l in job.output().splitlines() if "hvdkit: error: batch_size must be >= 1" in l]
    assert len(errors) == 2, job.output()[-3000:]
