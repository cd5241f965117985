"""Elastic training on one machine ('localhost' and '127.0.0.1' are two hosts to Horovod), torch and Keras.

Each test runs an example script (Keras also fed by tf.data) under an elastic horovodrun whose host discovery
reads a hosts file the test edits; audit records (steps as they start, rollbacks as markers) prove every sample
of every epoch was trained exactly once.
"""
import glob
import json
import os
import re
import time

import pytest

from elastic_harness import ElasticJob
from hvdkit.audit import check

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


def resize(job, hosts, world):
    """Edit the hosts file; wait until rank 0 reports the reset to ``world`` workers."""
    before = len(job.resets())
    job.set_hosts(hosts)
    job.wait_for(lambda: len(job.resets()) > before and job.resets()[-1]["to"] == world, f"a resize to {world} workers")


def resize_mid_epoch(job, framework, there, back):
    """Resize to ``there`` (hosts, world). A stream run must be re-dealt mid-epoch, but a resize lands on an epoch
    end ~15% of the time here; then it goes ``back`` and ``there`` again (at most 3 times) until one lands mid-epoch."""
    resize(job, *there)
    if framework.startswith("tfdata"):
        for _ in range(3):
            if any(r["sample"] > 0 for r in job.resets()):
                break
            resize(job, *back)
            resize(job, *there)
        assert any(r["sample"] > 0 for r in job.resets()), job.resets()


def epochs_for(framework):
    return 30 if framework.startswith("tfdata") else EPOCHS   # streams: time for a second resize if needed


@pytest.mark.parametrize("framework", WITH_FIT_TFDATA)
def test_host_added_mid_training(tmp_path, framework):
    epochs = epochs_for(framework)
    job = ElasticJob(str(tmp_path), framework, ONE, np=1, extra=COMMON + ["--epochs", str(epochs)])
    job.wait_for(lambda: job.max_step() >= 20, "20 steps on one worker")
    resize_mid_epoch(job, framework, there=(BOTH, 2), back=(ONE, 1))
    metrics = finished_exactly_once(job, {1, 2}, epochs)
    assert metrics["world_size"] == 2 and metrics["resets"] >= 1
    assert "workers 1 -> 2 (joined: 127.0.0.1/0" in job.output()


@pytest.mark.parametrize("framework", WITH_LOOP_TFDATA)
def test_host_removed_mid_training(tmp_path, framework):
    epochs = epochs_for(framework)
    job = ElasticJob(str(tmp_path), framework, BOTH, np=2, extra=COMMON + ["--epochs", str(epochs)])
    job.wait_for(lambda: job.max_step(world=2) >= 20, "20 steps on two workers")
    resize_mid_epoch(job, framework, there=(ONE, 1), back=(BOTH, 2))
    metrics = finished_exactly_once(job, {1, 2}, epochs)
    assert metrics["world_size"] == 1
    assert "left: 127.0.0.1/0" in job.output()


@pytest.mark.parametrize("framework", WITH_LOOP_TFDATA)
def test_worker_killed_mid_epoch_rolls_back_and_finishes(tmp_path, framework):
    # 15 epochs: the accuracy bar of a run without failures applies. The example's batch (32: 23 steps per epoch
    # on two workers), killed in epoch 2 between commits; a stream with batch 16 (45 steps per epoch: 0.983
    # without failures) is killed ~6 steps into epoch 2, so the commit it rolls back to is surely mid-epoch
    # and the rest of the epoch's shards are re-dealt to the survivor.
    stream = framework.startswith("tfdata")
    extra = ["--epochs", "15", "--commit-every", "5"] + (["--batch-size", "16"] if stream else [])
    job = ElasticJob(str(tmp_path), framework, BOTH, np=2, extra=extra)
    at = 52 if stream else 28
    job.wait_for(lambda: job.max_step(world=2) >= at, f"{at} steps on two workers")
    victim = job.worker_pids()["127.0.0.1"]
    os.kill(victim, 9)
    killed = time.time()
    job.wait_for(lambda: job.newest_commit_world() == 1, "a commit by the survivor after the kill")
    print(f"{framework}: {time.time() - killed:.2f} s from SIGKILL to the next committed step")
    metrics = finished_exactly_once(job, {1, 2}, epochs=15)
    rollback = re.search(r"rolled back to the commit at epoch (\d+), sample (\d+)", job.output())
    assert rollback, job.output()[-3000:]
    if stream:
        assert rollback.group(1) == "2" and int(rollback.group(2)) > 0, rollback.group(0)
    assert metrics["test_accuracy"] >= 0.95          # the bar a run without failures meets
    assert metrics["test_samples"] == 360


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_worker_failing_ends_the_job_with_a_clear_error(tmp_path, framework):
    job = ElasticJob(str(tmp_path), framework, BOTH, np=2, extra=["--batch-size", "0"], timeout=10)
    assert job.finish(timeout=120) != 0
    errors = [l for l in job.output().splitlines() if "hvdkit: error: batch_size must be >= 1" in l]
    assert len(errors) == 2, job.output()[-3000:]


def test_every_worker_killed_ends_the_job_without_hanging(tmp_path):
    job = ElasticJob(str(tmp_path), "torch", BOTH, np=2, extra=EXTRA, timeout=10)
    job.wait_for(lambda: job.max_step(world=2) >= 20, "20 steps on two workers")
    for pid in job.worker_pids().values():
        os.kill(pid, 9)
    assert job.finish(timeout=120) != 0


@pytest.mark.parametrize("framework", WITH_FIT_TFDATA)
def test_whole_job_restarted_on_fewer_workers_resumes_from_last_good_durable_commit(tmp_path, framework):
    first = ElasticJob(str(tmp_path), framework, BOTH, np=2, extra=EXTRA, tag="first")
    # epoch 2 spans steps 46-90 (commits at 45 = its start, 50, 55, ...): killed from step 57 on, the newest
    # commit is at 55 or later and the one before it, which the restart falls back to, mid-epoch
    first.wait_for(lambda: first.max_step(world=2) >= 57, "57 steps on two workers")
    first.kill()                                                   # the whole job, SIGKILL
    newest = sorted(glob.glob(os.path.join(first.ckpt, "ckpt-*.bin")))[-1]
    with open(newest, "r+b") as f:                                 # and its newest durable commit damaged
        f.truncate(50)
    second = ElasticJob(str(tmp_path), framework, ["localhost:1"], np=1, extra=EXTRA, tag="second")
    finished_exactly_once(second, {1, 2})
    out = second.output()
    assert f"{os.path.basename(newest)} is corrupt" in out
    resumed = re.search(r"resumed from ckpt-\S+: epoch (\d+), sample (\d+) of 1437, .*\(written by 2 workers, now 1\)", out)
    assert resumed and resumed.group(1) == "2" and int(resumed.group(2)) > 0, out[-3000:]
