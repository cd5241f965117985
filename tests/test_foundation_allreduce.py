"""A real 2-process allreduce of a torch and a TF tensor, under horovodrun (a static job: its MPI controller),
horovodrun --controller gloo (what elastic jobs run; torch only) and mpirun (OpenMPI).

Each is the first run of its framework's shared launch under that launcher (tests/conftest.py, ``shared_runs``):
it runs before anything else in those workers, so a broken launcher or controller shows here first.
"""
import json

import pytest

# Gloo with TF is what every Keras elastic test runs; a static TF launch on Gloo of its own would add ~13 s
CASES = [("torch", "horovodrun"), ("torch", "horovodrun-gloo"), ("torch", "mpirun"),
         ("tensorflow", "horovodrun"), ("tensorflow", "mpirun")]
SHARED_RUNS = {f"allreduce-{framework}-{launcher}": dict(
    framework=framework, launcher=launcher, np=2, order=0, script="tests/workers/allreduce.py",
    args=[framework, "{out}"], timeout=150) for framework, launcher in CASES}


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
