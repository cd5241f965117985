"""Elastic training with the sharded optimizer (``--shard-optimizer``, ZeRO stage 2) and Adam (two state tensors
and a step count per parameter). Two jobs of the torch digits example run side by side:

* the job under test grows from 2 workers to 3 when a host is added mid-epoch, then loses a worker to SIGKILL
  mid-epoch and rolls back to the commit of step 25, going on at 2;
* the reference is resized at the same steps without a failure: the same host added at step 10, then a host
  removed at step 25 (a clean shrink, no rollback).

Both must finish (exit 0) and train every sample of every epoch exactly once (audit). Adam's state must survive
both reshards (3 shards cut from 2 in memory, 2 cut from the commit of 3), which is checked twice:

1. Against the reference: after its rollback the job under test continues from the same commit, at the same world
   size, on the same samples, so both must hold the same parameters and Adam moments at the commits of steps 30 and
   62 (the end): 1e-5, the order of the float sums.
2. Around each resize: every durable commit is kept (tests/workers/zero_elastic.py) and holds the unsharded state
   gathered from the shards. From the commit a resize continued from (written by the old world) one process
   replays the next 5 steps with plain ``torch.optim.Adam`` on exactly the samples each rank trained (the audit)
   at the new world's LR, and must reach the next commit (written by the new world) to 1e-5. The same replay with
   Adam's state reset (what a lost or zeroed shard would be) must miss it by far more, so the check fails if a
   reshard lost the state.

A final accuracy bar and the per-rank state bytes in the metrics (half of the unsharded state at 2 workers)
complete it.

Steps at batch 32 and --commit-every 5 (1437 samples): 2 workers train 64 samples per step, 3 workers 96. Epoch 1:
steps 1-10 at 2 workers (gate after step 10: a host is added, the job resizes at the commit of step 10, sample
640), then 11-19 at 3 (797 samples; 19 is short). Epoch 2 at 3 workers from step 20 (commits 20, 25, 30): the job
under test is held after step 28, one worker is SIGKILLed, the survivors roll back to the commit of step 25 (sample
576) and train the epoch's rest at 2 (steps 26-39); the reference is held after step 25 and a host removed, so it
shrinks at that same commit. Epoch 3: steps 40-62 at 2.

About 60 s of the failing job's ~100 s is Gloo's: of the two survivors of a 3-worker job, one sees the dead peer's
connection reset at once, the other waits out HOROVOD_GLOO_TIMEOUT_SECONDS (60 s, hvdkit's elastic default) in a
recv before it fails too. The reference runs during that wait, so the pair costs little more than the failing job alone.
"""
import importlib.util
import io
import json
import os
import socket
import time

import numpy as np
import pytest

from hvdkit.audit import check
from proc import REPO, WORKERS

torch = pytest.importorskip("torch")

TRAIN_SAMPLES, EPOCHS, BATCH, LR = 1437, 3, 32, 0.002   # Adam's LR for one worker (scaled by the world size)
ADD_AT, KILL_AT, ROLLBACK_TO, WINDOW, LAST = 10, 28, 25, 5, 62
EXTRA = ["--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR), "--commit-every", "5",
         "--optimizer", "adam", "--shard-optimizer"]
ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")
TOLERANCE = 1e-5
ORIGINAL = ["localhost:1", "127.0.0.1:1"]


def third_host():
    """A third host name for Horovod on this machine: its hostname when that resolves to an address of this machine
    (Horovod then starts the worker locally, as for localhost and 127.0.0.1); otherwise a second slot on localhost."""
    from horovod.runner.util.network import get_local_host_addresses
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        address = None
    if name not in ("localhost", "127.0.0.1") and address in get_local_host_addresses():
        return name, ORIGINAL + [f"{name}:1"]
    return "localhost", ["localhost:2", "127.0.0.1:1"]


def example_model():
    spec = importlib.util.spec_from_file_location("example_torch_digits", os.path.join(REPO, "examples", "torch_digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_model()


def commit(job, step, world):
    """The newest durable commit of ``step`` written by ``world`` workers: the torch.save dict."""
    from hvdkit.checkpoint import CheckpointStore
    found = [m for m in job.manifests() if m["global_step"] == step and m["world_size"] == world]
    assert found, [(m["global_step"], m["world_size"]) for m in job.manifests()]
    number = int(os.path.basename(found[-1]["bin_path"])[len("ckpt-"):-len(".bin")])
    blob, _ = CheckpointStore(job.ckpt).verify(number)
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def trained_ids(job, first, last, world):
    """step -> [rank 0's ids, rank 1's, ...] of steps first..last trained by ``world`` workers (the newest record of
    each step and rank: an attempt undone by a rollback was recorded before it)."""
    newest = {}
    for r in sorted(job.records(), key=lambda r: r["time"]):
        if r["kind"] == "step" and first <= r["step"] <= last and r["world"] == world:
            newest[(r["step"], r["rank"])] = r["ids"]
    steps = {}
    for step in range(first, last + 1):
        assert all((step, rank) in newest for rank in range(world)), (step, sorted(newest))
        steps[step] = [np.asarray(newest[(step, rank)], dtype=np.int64) for rank in range(world)]
    return steps


def replay(before, steps, world, reset_state=False):
    """From the commit ``before``, the steps ``steps`` (step -> each rank's ids) at ``world`` workers in one process
    with plain Adam: each rank's mean loss weighted as the trainer weighs it (samples here x world / samples in the
    step), the gradients averaged over ranks, the LR scaled linearly by the world size. Returns (model, optimizer)."""
    from hvdkit.datasets import digits_split
    x, y, _, _ = digits_split()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    model = example_model()
    model.load_state_dict(before["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    optimizer.load_state_dict(before["optimizer"])
    assert optimizer.param_groups[0]["lr"] == LR and optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    if reset_state:
        optimizer.state.clear()
    for step in sorted(steps):
        ids = steps[step]
        total = sum(len(i) for i in ids)
        optimizer.zero_grad()
        for mine in ids:
            if len(mine):
                loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
                (loss * (len(mine) * world / total) / world).backward()
        for group in optimizer.param_groups:
            group["lr"] = LR * world
        optimizer.step()
    return model, optimizer


def adam_state(blob):
    """name -> tensor of the commit ``blob``'s parameters and every Adam state tensor (``exp_avg.3``, ...)."""
    found = {f"param.{name}": value for name, value in blob["model"].items()}
    state = blob["optimizer"]["state"]
    assert sorted(state) == list(range(6)), sorted(state)
    for index, entry in state.items():
        assert sorted(entry) == sorted(ADAM_STATE), sorted(entry)
        found.update({f"{key}.{index}": torch.as_tensor(entry[key], dtype=torch.float64) for key in ADAM_STATE})
    return found


def optimizer_blob(model, optimizer):
    """The commit-like dict of a replayed (model, optimizer)."""
    return {"model": dict(model.state_dict()), "optimizer": optimizer.state_dict()}


def distance(mine, theirs):
    """Largest difference between two commit-like dicts: (parameters, Adam state relative to its size)."""
    a, b = adam_state(mine), adam_state(theirs)
    assert sorted(a) == sorted(b)
    params = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k.startswith("param."))
    # exp_avg_sq is the square of gradients (1e-9 and smaller here): compared relative to each tensor's size
    state = max(float((a[k].double() - b[k].double()).abs().max() / max(float(b[k].double().abs().max()), 1e-30))
                for k in a if not k.startswith("param."))
    return params, state


def check_carried_over(job, step, world_before, world_after):
    """The resize at the commit of ``step`` (``world_before`` -> ``world_after``) kept Adam's state: see the module
    docstring. Returns the distances (kept, reset) for the report."""
    before, after = commit(job, step, world_before), commit(job, step + WINDOW, world_after)
    moments = before["optimizer"]["state"]
    assert len(moments) == 6 and all(float(s["exp_avg"].abs().max()) > 1e-6 and int(s["step"]) == step
                                     for s in moments.values()), {i: int(s["step"]) for i, s in moments.items()}
    steps = trained_ids(job, step + 1, step + WINDOW, world_after)
    assert all(len(ids) == BATCH for each in steps.values() for ids in each), "a short step inside the window"
    kept = distance(optimizer_blob(*replay(before, steps, world_after)), after)
    reset = distance(optimizer_blob(*replay(before, steps, world_after, reset_state=True)), after)
    print(f"resize {world_before} -> {world_after} at step {step}: replay from the commit to step {step + WINDOW} "
          f"misses by {kept[0]:.2g} (parameters), {kept[1]:.2g} (Adam state, relative); with Adam's state reset by "
          f"{reset[0]:.2g}, {reset[1]:.2g}")
    assert max(kept) <= TOLERANCE, (step, kept)
    assert min(reset) > 100 * TOLERANCE, (step, reset)   # the check can tell a reset state apart
    return kept, reset


def start(tmp_path, tag, gates):
    """One elastic job of the torch example in ``tmp_path/tag`` on localhost and 127.0.0.1, gated at ``gates``, its
    workers run by tests/workers/zero_elastic.py."""
    import elastic_harness
    directory = tmp_path / tag
    directory.mkdir()
    return elastic_harness.ElasticJob(str(directory), "torch", ORIGINAL, np=2, max_np=3, extra=EXTRA,
                                      gate_step=gates, tag=tag)


def grow(job, grown):
    """Event 1, both jobs: a host added while the 2 workers are held after step 10; the job grows at its commit."""
    job.wait_gate(["localhost", "127.0.0.1"], step=ADD_AT)
    job.change_hosts(grown)
    job.release(step=ADD_AT)


def check_job(job, resets, rolled_back):
    """Exit 0, exactly once, the expected resizes, and the metrics of one job; returns its metrics."""
    rc = job.finish(timeout=240)
    assert rc == 0, job.output()[-5000:]
    report = check(job.audit_dir, TRAIN_SAMPLES, EPOCHS)
    assert report["ok"], report["problems"]
    assert report["world_sizes"] == {0: [2, 3], 1: [2, 3], 2: [2]}, report
    assert (report["rollbacks"] >= 1) == rolled_back, report
    seen = job.resets()
    assert [(r["from"], r["to"], r["rolled_back"], r["epoch"], r["step"]) for r in seen] == resets, seen
    assert seen[0]["sample"] == ADD_AT * 2 * BATCH and seen[1]["sample"] == (ROLLBACK_TO - 19) * 3 * BATCH, seen
    with open(job.metrics) as f:
        metrics = json.load(f)
    assert metrics["world_size"] == 2 and metrics["epochs"] == EPOCHS, metrics
    assert metrics["train_samples_per_epoch"] == TRAIN_SAMPLES and metrics["resets"] == 2, metrics
    assert metrics["global_step"] == LAST, metrics
    assert metrics["test_accuracy"] >= 0.9, metrics
    n_params = sum(p.numel() for p in example_model().parameters())
    # Adam's two float32 moments for one shard of 2, and its step counts (a float32 scalar each, 6 at most)
    assert 2 * 4 * (n_params // 2) <= metrics["optimizer_state_bytes"] <= 2 * 4 * -(-n_params // 2) + 6 * 4, metrics
    final = job.manifests()[-1]
    assert final["world_size"] == 2 and final["global_step"] == LAST, final
    return metrics


def test_sharded_adam_job_grows_loses_a_worker_and_matches_a_job_resized_without_failure(tmp_path, monkeypatch):
    import elastic_harness
    monkeypatch.setattr(elastic_harness, "GATED", os.path.join(WORKERS, "zero_elastic.py"))
    started = time.time()
    added, grown = third_host()
    shrunk = [h for h in grown if not h.startswith("127.0.0.1")]
    failing = start(tmp_path, "failing", [ADD_AT, KILL_AT])
    reference = start(tmp_path, "reference", [ADD_AT, ROLLBACK_TO])
    try:
        grow(failing, grown)
        grow(reference, grown)
        # the job under test: all 3 held after step 28 (epoch 2); the worker on 127.0.0.1 is SIGKILLed
        held = failing.wait_gate(["localhost", "127.0.0.1", added], step=KILL_AT)
        os.kill(held["127.0.0.1"], 9)
        failing.release(step=KILL_AT)
        # the reference: held after step 25, 127.0.0.1 removed from the hosts; it shrinks at that step's commit
        reference.wait_gate(["localhost", "127.0.0.1", added], step=ROLLBACK_TO)
        reference.change_hosts(shrunk)
        reference.release(step=ROLLBACK_TO)
        metrics = check_job(failing, [(2, 3, False, 1, ADD_AT), (3, 2, True, 2, ROLLBACK_TO)], rolled_back=True)
        wall = time.time() - started
        expected = check_job(reference, [(2, 3, False, 1, ADD_AT), (3, 2, False, 2, ROLLBACK_TO)], rolled_back=False)
    finally:
        failing.kill()
        reference.kill()

    # 1. the same state as the job resized without a failure, right after the resize and at the end
    matched = {step: distance(commit(failing, step, 2), commit(reference, step, 2)) for step in (ROLLBACK_TO + 5, LAST)}
    assert all(max(d) <= TOLERANCE for d in matched.values()), matched
    assert abs(metrics["test_loss"] - expected["test_loss"]) <= 1e-5, (metrics, expected)
    # 2. each resize window replayed from its commit, and told apart from a reset state
    grew = check_carried_over(failing, ADD_AT, 2, 3)              # 3 shards cut from the state of 2 (in memory, joined)
    shrank = check_carried_over(failing, ROLLBACK_TO, 3, 2)       # 2 shards cut from the commit of 3 (rollback)
    print(f"zero elastic (Adam): {wall:.0f} s, test accuracy {metrics['test_accuracy']:.4f}, "
          f"{metrics['optimizer_state_bytes']} optimizer-state bytes per rank; against the reference {matched}; "
          f"replays {grew} {shrank}")
