"""The last seconds of a job: a worker killed while rank 0's final side effects are due, or after them.

Definitions (README, "The end of a job"):
- elastic: the final evaluation and the final checkpoint belong to the last commit; the metrics file is written
  by rank 0 in ``on_train_end`` inside the elastic loop, followed by one collective every rank must reach. A
  worker lost before that collective rolls the others back to the last commit (no training repeated) and the
  rank 0 of the new world writes the outputs: exit 0, every output present, one final checkpoint.
- static: a worker lost before the outputs are written fails the job (non-zero exit); never exit 0 without them.
- a worker killed after the job completed (every rank past the final collective, outputs written): horovodrun
  still exits non-zero (any worker's non-zero exit is its rule; mpirun's under a static job); ``hvdkit launch`` sees rank 0's "training complete" line
  and that the lost workers were killed by a signal, and exits 0 with one warning line.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from hvdkit.launch import launch_command
from proc import REPO, WORKERS, kill_marked

GATED = os.path.join(WORKERS, "gated.py")


def _rank_pids(gate_dir):
    """rank -> pid of the workers holding at the on_train_end gate (gated.py writes rank<r>-<pid>)."""
    found = {}
    for name in os.listdir(gate_dir):
        if name.startswith("rank") and not name.endswith(".tmp"):
            rank, pid = name[len("rank"):].split("-")
            found[int(rank)] = int(pid)
    return found


def test_elastic_rank0_killed_before_its_final_side_effects_the_new_rank0_writes_them(elastic_job):
    job = elastic_job("torch", ["localhost:1", "127.0.0.1:1"], 2, extra=["--epochs", "2"], gate_at="end")
    job.wait_gate(["localhost", "127.0.0.1"])
    job.wait_for(lambda: len(_rank_pids(job.gate_dir)) == 2, "both ranks at the on_train_end gate", 30)
    os.kill(_rank_pids(job.gate_dir)[0], signal.SIGKILL)
    job.release()
    code = job.finish(timeout=200)
    output = job.output()
    assert code == 0, output[-4000:]
    with open(job.metrics) as f:
        metrics = json.load(f)
    assert metrics["epochs"] == 2 and metrics["world_size"] == 1 and metrics["test_accuracy"] > 0.8, metrics
    assert metrics["resets"] == 1
    (reset,) = job.resets()
    assert reset["rolled_back"] and reset["epoch"] == 3 and reset["to"] == 1   # the final commit: nothing retrained
    finals = [m for m in job.manifests() if m["epoch"] == 2]
    assert len(finals) == 1, finals   # the final checkpoint written once, by the commit
    steps = [r for r in job.records() if r["kind"] == "step"]
    assert max(r["step"] for r in steps) == finals[0]["global_step"]  # no step after the last commit


def _static(tmp_path, gate_at, through_hvdkit=False, controller=None):
    gate = tmp_path / "gate"
    gate.mkdir()
    metrics = tmp_path / "metrics.json"
    script = [GATED, os.path.join(REPO, "examples/torch_digits.py"), "--epochs", "1", "--no-progress",
              "--metrics-json", str(metrics)]
    if through_hvdkit:
        cmd = [os.path.join(os.path.dirname(sys.executable), "hvdkit"), "launch", "-np", "2", *script]
    else:
        cmd = launch_command(script, np=2, python=sys.executable, controller=controller)
    marker = f"static-end-{os.getpid()}-{tmp_path.name}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HVDKIT_TEST_JOB=marker, HVDKIT_GATE_DIR=str(gate),
               HVDKIT_GATE_AT=gate_at)
    log = open(tmp_path / "out.txt", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    return proc, gate, metrics, marker, log


def _wait(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"job ended (exit {proc.returncode}) early"
        time.sleep(0.1)
    raise AssertionError("timed out")


def _finish(proc, marker, log, timeout=120):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the job hung after a worker was killed")
    finally:
        kill_marked(marker)
        log.close()


@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_static_rank0_killed_before_its_outputs_fails_the_job(tmp_path, controller):
    proc, gate, metrics, marker, log = _static(tmp_path, "end", controller=controller)
    try:
        _wait(lambda: len(_rank_pids(gate)) == 2, proc)
        os.kill(_rank_pids(gate)[0], signal.SIGKILL)
        (gate / "release").touch()
        code = _finish(proc, marker, log)
    finally:
        kill_marked(marker)
    output = (tmp_path / "out.txt").read_text()
    assert code != 0, output[-3000:]
    assert not metrics.exists()
    if controller == "gloo":   # rank 1 stopped at the final collective, said why (under MPI mpirun ends it at once)
        assert "another rank failed or left the job" in output


def test_worker_killed_after_the_job_completed_is_success_under_hvdkit_launch(tmp_path):
    proc, gate, metrics, marker, log = _static(tmp_path, "exit", through_hvdkit=True)
    try:
        reached = lambda: [n for n in os.listdir(gate) if n.startswith("reached-") and not n.endswith(".tmp")]
        _wait(lambda: len(reached()) == 2, proc)
        assert metrics.exists()   # every rank past fit: the outputs are written
        pids = sorted(int(n.rsplit("-", 1)[1]) for n in reached())
        os.kill(pids[-1], signal.SIGKILL)
        (gate / "release").touch()
        code = _finish(proc, marker, log)
    finally:
        kill_marked(marker)
    output = (tmp_path / "out.txt").read_text()
    # horovodrun (mpirun under it, for a static job) exits non-zero: any worker's non-zero exit fails its job;
    # hvdkit launch knows training had completed
    assert code == 0, output[-3000:]
    assert "hvdkit: warning: training completed and its outputs were written; rank" in output
    assert "killed by signal 9" in output and re.search(r"so horovodrun exited \d+: treated as success", output)
    assert json.loads(metrics.read_text())["epochs"] == 1
