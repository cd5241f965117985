"""Elastic training on one machine ('localhost' and '127.0.0.1' are two hosts to Horovod), torch and Keras.

Each test runs an example script (Keras also fed by tf.data) under an elastic horovodrun whose host discovery
reads a hosts file the test edits; audit records (steps as they start, rollbacks as markers) prove every sample
of every epoch was trained exactly once. Kills and resizes happen at a known step: the workers wait at a gate
(tests/workers/gated.py) after step N while the test acts, so the commit a job resizes at or rolls back to is
known exactly, and is chosen mid-epoch.

Steps at batch 16 and --commit-every 5 (1437 samples): one worker trains 90 steps per epoch, two 45 (epoch 2 of
two workers is steps 46-90); at batch 32 two workers train 23 (epoch 2 is steps 24-46). A commit is made every
5th step and at each epoch end.
"""
import json
import os
import re
import sys
import time

import pytest

from hvdkit.audit import check
from hvdkit.scripting import scheduled_lr
from proc import WORKERS

sys.path.insert(0, WORKERS)
import lr_checks  # noqa: E402  (tests/workers)

FRAMEWORKS = ["torch", "tensorflow"]
# tf.data inputs (TFStream) are re-split mid-epoch too: Keras fit for joins and restarts, the loop for leaves and kills
WITH_FIT_TFDATA = FRAMEWORKS + ["tfdata"]
WITH_LOOP_TFDATA = FRAMEWORKS + ["tfdata-loop"]
TRAIN_SAMPLES, EPOCHS = 1437, 8
COMMON = ["--batch-size", "16", "--commit-every", "5"]
EXTRA = ["--epochs", str(EPOCHS)] + COMMON
BOTH, ONE = ["localhost:1", "127.0.0.1:1"], ["localhost:1"]


def finished_exactly_once(job, world_sizes_seen, epochs=EPOCHS):
    rc = job.finish()
    assert rc == 0, job.output()[-5000:]
    report = check(job.audit_dir, TRAIN_SAMPLES, epochs)
    assert report["ok"], report["problems"]
    seen = {w for ws in report["world_sizes"].values() for w in ws}
    assert seen == world_sizes_seen, report
    with open(job.metrics) as f:
        metrics = json.load(f)
    assert metrics["epochs"] == epochs and metrics["train_samples_per_epoch"] == TRAIN_SAMPLES
    return metrics


def resize_at_gate(job, hosts_before, hosts_after):
    """With the workers held after the gate step (a multiple of --commit-every), edit the hosts file, wait
    until horovodrun has told rank 0, release: the resize happens at the commit of that step."""
    job.wait_gate([h.split(":")[0] for h in hosts_before])
    job.change_hosts(hosts_after)
    job.release()


@pytest.mark.parametrize("framework", WITH_FIT_TFDATA)
def test_host_added_mid_training(elastic_job, framework, tmp_path):
    lr_log = str(tmp_path / "lr")
    schedule = ["--lr", "0.05", "--lr-schedule", "step", "--lr-decay-steps", "30"]   # x0.1 every 30 steps
    job = elastic_job(framework, ONE, np=1, extra=EXTRA + schedule, gate_step=20, env={"HVDKIT_LR_LOG": lr_log})
    resize_at_gate(job, ONE, BOTH)
    metrics = finished_exactly_once(job, {1, 2})
    # the LR each step applied, read from the optimizer: the schedule x the world size at that step; the resize at
    # step 20 doubles it and does not restart the schedule (a restart would give 0.1 instead of 0.01 from step 31)
    records = lr_checks.read_log(lr_log)
    assert {r["size"] for r in records} == {1, 2}
    assert not lr_checks.mismatches(records, lambda t: [scheduled_lr("step", 0.05, 30, t)], "linear", 0)
    assert metrics["world_size"] == 2 and metrics["resets"] >= 1
    assert "workers 1 -> 2 (joined: 127.0.0.1/0" in job.output()
    reset = job.resets()[0]   # step 20 of epoch 1 (90 steps on one worker): a stream is re-dealt mid-epoch
    assert (reset["from"], reset["to"], reset["epoch"], reset["step"]) == (1, 2, 1, 20), reset
    assert reset["sample"] == 20 * 16, reset


@pytest.mark.parametrize("framework", WITH_LOOP_TFDATA)
def test_host_removed_mid_training(elastic_job, framework):
    job = elastic_job(framework, BOTH, np=2, extra=EXTRA, gate_step=20)
    resize_at_gate(job, BOTH, ONE)
    metrics = finished_exactly_once(job, {1, 2})
    assert metrics["world_size"] == 1
    assert "left: 127.0.0.1/0" in job.output()
    reset = job.resets()[0]   # step 20 of epoch 1 (45 steps on two workers)
    assert (reset["from"], reset["to"], reset["epoch"], reset["step"]) == (2, 1, 1, 20), reset
    assert reset["sample"] == 20 * 32, reset


@pytest.mark.parametrize("framework", WITH_LOOP_TFDATA)
def test_worker_killed_mid_epoch_rolls_back_and_finishes(elastic_job, framework):
    # 15 epochs: the accuracy bar of a run without failures applies. The example's batch (32: epoch 2 is steps
    # 24-46 on two workers) is killed after step 28, a stream with batch 16 (epoch 2 is steps 46-90; 0.983
    # without failures) after step 52: both roll back to the commit 3 and 2 steps before, mid-epoch 2, and the
    # rest of the epoch is re-dealt to the survivor.
    stream = framework.startswith("tfdata")
    extra = ["--epochs", "15", "--commit-every", "5"] + (["--batch-size", "16"] if stream else [])
    at, commit, global_batch = (52, 50, 32) if stream else (28, 25, 64)
    epoch_start = 45 if stream else 23   # the step that ended epoch 1
    job = elastic_job(framework, BOTH, np=2, extra=extra, gate_step=at)
    victim = job.wait_gate(["localhost", "127.0.0.1"])["127.0.0.1"]
    os.kill(victim, 9)
    killed = time.time()
    job.release()
    job.wait_for(lambda: job.newest_commit_world() == 1, "a commit by the survivor after the kill")
    print(f"{framework}: {time.time() - killed:.2f} s from SIGKILL to the next committed step")
    metrics = finished_exactly_once(job, {1, 2}, epochs=15)
    rollbacks = [r for r in job.resets() if r["rolled_back"]]
    assert rollbacks, job.output()[-3000:]
    assert (rollbacks[0]["from"], rollbacks[0]["to"], rollbacks[0]["epoch"], rollbacks[0]["step"]) == \
        (2, 1, 2, commit), rollbacks[0]
    assert rollbacks[0]["sample"] == (commit - epoch_start) * global_batch, rollbacks[0]
    assert metrics["test_accuracy"] >= 0.95          # the bar a run without failures meets
    assert metrics["test_samples"] == 360


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_worker_failing_ends_the_job_with_a_clear_error(elastic_job, framework):
    job = elastic_job(framework, BOTH, np=2, extra=["--batch-size", "0"], timeout=10)
    assert job.finish(timeout=120) != 0
    errors = [l for l in job.output().splitlines() if "hvdkit: error: batch_size must be >= 1" in l]
    assert len(errors) == 2, job.output()[-3000:]


def test_every_worker_killed_ends_the_job_without_hanging(elastic_job):
    job = elastic_job("torch", BOTH, np=2, extra=EXTRA, timeout=10, gate_step=20)
    for pid in job.wait_gate(["localhost", "127.0.0.1"]).values():
        os.kill(pid, 9)
    assert job.finish(timeout=120) != 0


@pytest.mark.parametrize("framework", WITH_FIT_TFDATA)
def test_whole_job_restarted_on_fewer_workers_resumes_from_last_good_durable_commit(elastic_job, framework):
    first = elastic_job(framework, BOTH, np=2, extra=EXTRA, tag="first", gate_step=57)
    # held after step 57 of epoch 2 (steps 46-90; commits at 45 = its start, 50, 55), every commit durable:
    # the newest checkpoint is step 55's and the one before it, which the restart falls back to, step 50's
    first.wait_gate(["localhost", "127.0.0.1"])
    first.kill()                                                   # the whole job, SIGKILL
    *_, previous, newest = first.manifests()
    assert (previous["global_step"], newest["global_step"]) == (50, 55), (previous, newest)
    with open(newest["bin_path"], "r+b") as f:                     # and its newest durable commit damaged
        f.truncate(50)
    second = elastic_job(framework, ONE, np=1, extra=EXTRA, tag="second")
    finished_exactly_once(second, {1, 2})
    out = second.output()
    assert f"{os.path.basename(newest['bin_path'])} is corrupt" in out, out[-3000:]
    resumed = re.search(r"resumed from (ckpt-\S+): epoch (\d+), sample (\d+) of 1437, step (\d+) .*"
                        r"\(written by 2 workers, now 1\)", out)
    assert resumed, out[-3000:]
    assert resumed.group(1) == os.path.basename(previous["bin_path"]), resumed.group(0)
    assert resumed.groups()[1:] == ("2", str((50 - 45) * 32), "50"), resumed.group(0)
