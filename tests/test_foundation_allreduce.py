"""A real 2-process allreduce of a torch and a TF tensor, under horovodrun (Gloo) and mpirun (OpenMPI)."""
import json

import pytest

from proc import explain, launch


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_two_process_allreduce(tmp_path, launcher, framework):
    result = launch("tests/workers/allreduce.py", [framework, str(tmp_path)], np=2, launcher=launcher, timeout=150)
    assert result.returncode == 0, explain(result)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["size"] == 2
        # rank r holds [0,1,2,3] * (r+1): the sum is [0,1,2,3] * 3, the average half of it
        assert record["sum"] == [0.0, 3.0, 6.0, 9.0]
        assert record["average"] == [0.0, 1.5, 3.0, 4.5]
        # the controller is the one the launcher asked for
        assert record["gloo"] == (launcher == "horovodrun")
        assert record["mpi"] == (launcher == "mpirun")
