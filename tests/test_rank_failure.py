"""One rank raises an ordinary error (a bug, not a lost peer): every rank ends, in bounded time, with its line.

Faults are injected by tests/workers/gated.py (HVDKIT_FAULT=where:rank[:step]): in a user callback during
training, in data loading, in on_train_begin (before training) and in on_train_end (before rank 0's final side
effects). Static jobs: the failing rank shuts Horovod down so the others' pending collectives fail at once;
they stop with a line pointing at it. Elastic jobs: every rank stops with the failing rank's own line after one
rollback (the rollback is how the line reaches them), never retrying with or without it.

The bound asserted here, from the fault to the launcher's exit with every worker gone, is FAIL_BOUND seconds;
measured here (2 cores, shared): 2.5-4 s static, 4-5 s elastic (it includes one Horovod re-initialisation).
"""
import os
import re
import time

import pytest

from proc import REPO, WORKERS, explain, launch

GATED = os.path.join(WORKERS, "gated.py")
FAIL_BOUND = 45.0
FAULT_TIME = re.compile(r"injected fault in .* at unix time (\d+\.\d+)")


def fault_to_exit(output: str, ended: float) -> float:
    found = FAULT_TIME.findall(output)
    assert found, output[-3000:]
    print(f"from the fault to the launcher's exit: {ended - float(found[0]):.1f} s")
    return ended - float(found[0])


@pytest.mark.parametrize("launcher,script,flags,fault,failing,where", [
    ("horovodrun", "examples/torch_digits.py", [], "step:1:5", "on_step_end at step 5", r"at epoch 1, step 5"),
    ("mpirun", "examples/keras_digits.py", ["--mode", "loop"], "data:0:4", "data loading (batch 4)",
     r"at epoch 1, step \d+"),
    ("horovodrun-gloo", "examples/torch_digits.py", [], "begin:1", "on_train_begin", r"before training"),
    ("horovodrun", "examples/torch_digits.py", [], "end:0", "on_train_end", r"after training \(step \d+\)"),
])
def test_static_job_ends_on_every_rank_with_the_failing_ranks_line(tmp_path, launcher, script, flags, fault, failing,
                                                                    where):
    rank = int(fault.split(":")[1])
    metrics = tmp_path / "metrics.json"
    result = launch(GATED, [os.path.join(REPO, script), *flags, "--epochs", "2",
                            "--no-progress", "--metrics-json", str(metrics)],
                    launcher=launcher, timeout=150, env={"HVDKIT_FAULT": fault})
    ended = time.time()
    output = result.stdout + result.stderr
    assert result.returncode != 0, explain(result)
    assert re.search(rf"hvdkit: error: rank {rank} failed {where}: RuntimeError: injected fault in "
                     rf"{re.escape(failing)}", output), explain(result)
    # the other rank says why it stopped (unless the launcher's SIGTERM came first: then it says nothing)
    other = re.findall(rf"hvdkit: error: rank {1 - rank} (.*)", output)
    assert all("another rank failed or left the job" in line for line in other), other
    assert not metrics.exists()  # never a metrics file from a failed job
    assert fault_to_exit(output, ended) < FAIL_BOUND


@pytest.mark.parametrize("framework,fault,line", [
    ("torch", "begin:1", r"rank 1 failed before training: RuntimeError: injected fault in on_train_begin"),
    ("torch", "end:0", r"rank 0 failed after training \(step \d+\): RuntimeError: injected fault in on_train_end"),
    ("tensorflow", "step:1:4", r"rank 1 failed at epoch 1, step 4: RuntimeError: injected fault in on_step_end"),
])
def test_elastic_job_stops_every_rank_with_the_failing_ranks_line(elastic_job, framework, fault, line):
    job = elastic_job(framework, ["localhost:1", "127.0.0.1:1"], 2, extra=["--epochs", "2"],
                      env={"HVDKIT_FAULT": fault})
    code = job.finish(timeout=200)
    ended = time.time()
    output = job.output()
    assert code != 0, output[-4000:]
    # both ranks print the same line: the failing rank's own, not "a peer was lost"
    for rank in (0, 1):
        assert re.search(rf"\[{rank}\]<stderr>:hvdkit: error: {line}", output), output[-4000:]
    assert len(job.resets()) == 0   # never resumed training (with or without the failing worker)
    assert "failure count == 2 -> stop running" in output   # Horovod's driver saw every worker stop
    assert not os.path.exists(job.metrics)
    assert fault_to_exit(output, ended) < FAIL_BOUND
