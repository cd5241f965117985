"""A real 2-process allreduce of a torch and a TF tensor, under horovodrun (a static job: its MPI controller),
horovodrun --controller gloo (what elastic jobs run; torch only) and mpirun (OpenMPI).

Each is the first run of its framework's shared launch under that launcher (tests/conftest.py, ``shared_runs``):
it runs before anything else in those workers, so a broken launcher or controller shows here first. The torch
runs under the MPI controller then sit idle for two windows of IDLE_SECONDS and report, per window, their busiest
threads' CPU time (the idle-spin patch).
"""
import json

import pytest

# Gloo with TF is what every Keras elastic test runs; a static TF launch on Gloo of its own would add ~13 s
CASES = [("torch", "horovodrun"), ("torch", "horovodrun-gloo"), ("torch", "mpirun"),
         ("tensorflow", "horovodrun"), ("tensorflow", "mpirun")]
IDLE_SECONDS = 2.0
# Patch 5 is in the MPI controller's loop. Under Gloo, which it does not touch, an idle rank's busiest thread was 3-5%
# of a core on a quiet machine and 2-13% beside busy loops here, but in CI (both lanes starting their first
# launches) one rank's busiest thread held 40% of a core (one window) and 34-35% (both windows; its peer 19%) in 2
# of the last 3 CI runs (cause not found). Edit 5 is not in that loop, so it is not what this test checks.
IDLE_LAUNCHERS = ["horovodrun", "mpirun"]
SHARED_RUNS = {f"allreduce-{framework}-{launcher}": dict(
    framework=framework, launcher=launcher, np=2, order=0, script="tests/workers/allreduce.py",
    args=[framework, "{out}"] + ([str(IDLE_SECONDS)] if framework == "torch" and launcher in IDLE_LAUNCHERS else []),
    timeout=150)
    for framework, launcher in CASES}


@pytest.mark.parametrize("framework, launcher", CASES)
def test_two_process_allreduce(shared_runs, launcher, framework):
    run = shared_runs.get(f"allreduce-{framework}-{launcher}")
    records = [json.loads((run.out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["size"] == 2
        # rank r holds [0,1,2,3] * (r+1): the sum is [0,1,2,3] * 3, the average half of it
        assert record["sum"] == [0.0, 3.0, 6.0, 9.0]
        assert record["average"] == [0.0, 1.5, 3.0, 4.5]
        # the controller is the one the launcher asked for
        assert record["gloo"] == (launcher == "horovodrun-gloo")
        assert record["mpi"] == (launcher != "horovodrun-gloo")
        assert record["cpu_ops"] == ("gloo" if launcher == "horovodrun-gloo" else "mpi")   # the tensor ops too


@pytest.mark.parametrize("launcher", IDLE_LAUNCHERS)
def test_idle_job_does_not_spin(shared_runs, launcher):
    """No thread of an idle rank busy-waits: unpatched, under the MPI controller one rank's Horovod background
    thread spent 73-92% of a core here (96-99% on a quiet machine) waiting in the next negotiation
    (mpi/patch_horovod.py, edit 5); patched, 2-5%. A spin holds its core all along, so the calmer of two windows is
    checked (each window: the busier rank). Load from other processes lowers a spinning thread's share, so on a busy
    machine an unpatched build may pass; on a quiet one it fails."""
    run = shared_runs.get(f"allreduce-torch-{launcher}")
    windows = [json.loads((run.out / f"rank{rank}.json").read_text())["idle_windows"] for rank in range(2)]
    assert all(len(w) == 2 and all(window["seconds"] >= IDLE_SECONDS for window in w) for w in windows)
    # per window the busier rank (a spin that moved from one rank to the other still counts), then the calmer window
    shares = [max(w[i]["busiest"][0][0] / w[i]["seconds"] for w in windows) for i in range(2)]
    assert min(shares) < 0.3, (f"a thread used {shares[0]:.0%} of a core in the first {IDLE_SECONDS:.0f}-s window "
                               f"and {shares[1]:.0%} in the second while the job sat idle (is mpi/patch_horovod.py's "
                               f"edit 5 built in?); per rank, window, the two busiest "
                               f"threads as (CPU s, name, tid - pid): {[[x['busiest'] for x in w] for w in windows]}")
