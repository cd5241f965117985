"""The examples as a user runs them: real digits data, both launchers, both frameworks, bad input.

The runs that succeed are part of their framework's shared launch under their launcher (tests/conftest.py,
``shared_runs``; tests/workers/runs.py runs each example as ``python examples/x.py ARGS`` would). Bad input ends
a launch, so each such case is a launch of its own: here under horovodrun the checkpoint directory (checked by
every rank together) and under mpirun Keras; the same checks for torch's --batch-size 0 under both launchers are
in tests/test_launch.py (``hvdkit launch``: every rank's line, exit 2, no traceback), and the lines themselves,
--limit-train 0 included, in tests/test_bad_input.py (in-process).
"""
import json
import os
import re

import numpy as np
import pytest

from proc import explain, launch

DIGITS = {"torch": "examples/torch_digits.py", "tensorflow": "examples/keras_digits.py"}
SYNTHETIC = {"torch": "examples/torch_synthetic.py", "tensorflow": "examples/keras_synthetic.py"}
LAUNCHERS = ["horovodrun", "mpirun"]
SHARED_RUNS = {f"digits-{framework}-{launcher}": dict(
    framework=framework, launcher=launcher, np=2, order=60, script=DIGITS[framework],
    args=["--metrics-json", "{out}/m.json", "--tensorboard-dir", "{out}/tb", "--checkpoint-dir", "{out}/ckpt"],
    timeout=300) for framework in DIGITS for launcher in LAUNCHERS}
SHARED_RUNS.update({f"synthetic-{framework}": dict(
    framework=framework, launcher="horovodrun", np=2, order=60, script=SYNTHETIC[framework],
    args=["--samples", "512", "--metrics-json", "{out}/m.json"], timeout=240) for framework in SYNTHETIC})


def newest_checkpoint_progress(ckpt, framework):
    newest = ckpt / sorted(f for f in os.listdir(ckpt) if f.endswith(".bin"))[-1]
    if framework == "torch":
        import torch
        state = torch.load(newest, weights_only=True)   # a plain torch file, safe loader
        assert "model" in state and "optimizer" in state
        return state["progress"]
    saved = np.load(newest, allow_pickle=False)           # Keras: an .npz of variables
    assert any(k.startswith("model/") for k in saved.files)
    return json.loads(str(saved["progress"]))


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_digits_reaches_95_percent_on_two_workers(shared_runs, framework, launcher):
    out = shared_runs.get(f"digits-{framework}-{launcher}").out
    m = json.loads((out / "m.json").read_text())
    assert m["framework"] == framework and m["world_size"] == 2 and m["epochs"] == 20
    assert m["global_batch_size"] == 64
    assert m["train_samples_per_epoch"] == 1437          # summed over ranks: the whole train split
    assert m["test_samples"] == 360                      # each test sample counted once
    assert m["test_accuracy"] >= 0.95
    assert m["samples_per_sec"] > 0
    # Rank-0-only side effects: one TensorBoard event file, one set of checkpoints.
    assert len([f for f in os.listdir(out / "tb") if f.startswith("events.out.tfevents")]) == 1
    assert newest_checkpoint_progress(out / "ckpt", framework)["epoch"] == 20


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_synthetic_throughput_examples_run(shared_runs, framework):
    m = json.loads((shared_runs.get(f"synthetic-{framework}").out / "m.json").read_text())
    assert m["world_size"] == 2 and m["train_samples_per_epoch"] == 512 and m["test_samples"] == 1024
    assert m["samples_per_sec"] > 0


def test_bad_input_is_one_clear_line_on_every_rank(tmp_path):
    """A checkpoint directory that cannot be created: every rank ends with the same line (the ranks agree on it),
    no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a directory is expected")
    flags, message = ["--checkpoint-dir", f"{blocker}/sub"], "cannot be created or written"
    result = launch(DIGITS["torch"], flags + ["--epochs", "1"], np=2, launcher="horovodrun", timeout=120)
    assert result.returncode != 0, explain(result)
    lines = [l for l in result.stderr.splitlines() + result.stdout.splitlines() if "hvdkit: error:" in l]
    # One line per rank that reached its check. The launcher (mpirun, under a static horovodrun job) stops the other
    # workers as soon as one exits non-zero, so under load a rank still importing torch may be stopped before it
    # gets there.
    ranks = [re.match(r"\[(?:\d+,)?(\d+)\]<stderr>:", l).group(1) for l in lines]   # [job,rank] tags
    assert lines and sorted(set(ranks)) == sorted(ranks) and set(ranks) <= {"0", "1"}, explain(result)
    assert all(message in l for l in lines)
    # the workers print no traceback (horovodrun itself reports the failed job with one)
    assert not [l for l in result.stderr.splitlines() if "<stderr>:Traceback" in l], explain(result)


def test_bad_input_under_mpirun_exits_without_hanging():
    result = launch(DIGITS["tensorflow"], ["--batch-size", "0"], np=2, launcher="mpirun", timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("hvdkit: error: batch_size must be >= 1") == 2, explain(result)


def test_tfdata_input_stopped_and_resumed_on_other_worker_counts_trains_each_sample_once(tmp_path):
    """One epoch of a tf.data input over 3, then 1 workers (stopped mid-epoch, resumed from the checkpoint):
    every sample of every epoch is trained exactly once (audit). (A restart on more workers than wrote the
    checkpoint, tf.data included: tests/test_elastic.py, the ``killed`` jobs.)"""
    from hvdkit.audit import check
    common = ["--input", "tfdata", "--epochs", "2", "--batch-size", "16", "--checkpoint-dir", str(tmp_path / "ckpt"),
              "--audit-dir", str(tmp_path / "audit"), "--no-progress"]
    # 15 steps of 3 x 16 = sample 720 of 1437; then the rest on 1 worker
    for np_, launcher, stop in [(3, "mpirun", 15), (1, "horovodrun", None)]:
        flags = common + (["--stop-after-steps", str(stop)] if stop else ["--metrics-json", str(tmp_path / "m.json")])
        result = launch(DIGITS["tensorflow"], flags, np=np_, launcher=launcher, timeout=240)
        assert result.returncode == 0, explain(result)
        if stop:
            assert f"stopped at step {stop} before evaluating" in result.stdout, explain(result)
    out = result.stdout + result.stderr
    assert "epoch 1, sample 720 of 1437, step 15 (written by 3 workers, now 1)" in out, explain(result)
    report = check(str(tmp_path / "audit"), 1437, 2)
    assert report["ok"], report["problems"]
    assert report["world_sizes"][0] == [1, 3] and report["world_sizes"][1] == [1]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["epochs"] == 2 and m["train_samples_per_epoch"] == 1437 and m["test_samples"] == 360
