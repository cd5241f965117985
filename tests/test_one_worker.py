"""One static worker (``horovodrun -np 1``, or any job of size 1) steps without Horovod: averaging over one rank
is the identity, so no per-step collective waits for Horovod's background cycle. Read back from Horovod's own
timeline: which collectives it ran while a BatchNorm model trained, plain and sharded, in torch and Keras."""
import json
import re
import sys

import pytest

from proc import WORKERS, explain, run

# what a static fit at one worker may still send through Horovod: the initial broadcast of the parameters and of
# rank 0's objects, and the random states gathered at commits (none of them per step); torch's names, then Keras'
ALLOWED = re.compile(r"^(broadcast\.|allgather\.hvdkit\.gather\.|HorovodBroadcast|HorovodAllgather$)")


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_one_static_worker_runs_no_per_step_collective(tmp_path, framework):
    timeline, out = tmp_path / "timeline.json", tmp_path / "result.json"
    result = run([sys.executable, f"{WORKERS}/one_worker.py", framework, str(timeline), str(out)], timeout=180,
                 env={"HOROVOD_TIMELINE": "DYNAMIC"})
    assert result.returncode == 0, explain(result)
    record = json.loads(out.read_text())
    for shard in (False, True):
        assert record[f"shard={shard}"]["size"] == 1 and record[f"shard={shard}"]["steps"] == 12
    if framework == "torch":   # the user's optimizer steps, not Horovod's wrapper
        assert record["shard=False"]["optimizer"] == "torch.optim.adam.Adam"
    ops = set(re.findall(r'"args": \{"name": "([^"]+)"\}', timeline.read_text()))   # one per tensor Horovod saw
    assert ops, "the timeline recorded nothing: it cannot show what ran"
    assert any(op.lower().startswith(("broadcast.", "horovodbroadcast_")) for op in ops)   # what the fit did send
    per_step = sorted(op for op in ops if not ALLOWED.match(op))
    assert per_step == [], per_step   # no gradient allreduce, reduce-scatter, allgather of shards or norm allreduce
