"""Elastic training with the sharded optimizer (``--shard-optimizer``, ZeRO stage 2): one job of the torch digits
example (SGD with momentum 0.9: one state tensor per parameter) grows from 2 workers to 3 when a host is added
mid-epoch, then loses a worker to SIGKILL mid-epoch and rolls back to 2. It must finish (exit 0), train every sample
of every epoch exactly once (audit), and carry the momentum over both reshards (3 shards cut from 2, 2 from 3).

How the momentum is checked. A reference job resized at the same steps without the failure is a second launch
(this test keeps to one), so the check is made on the job itself, around each resize: every durable commit is kept
(tests/workers/zero_elastic.py), and each commit holds the unsharded state gathered from the shards. From the commit
a resize continued from (written by the old world) one process replays the next 5 steps with plain
``torch.optim.SGD`` on exactly the samples each rank trained (the audit) at the new world's LR, and must reach the
state of the next commit (written by the new world, gathered from its shards) to 1e-5, parameters and momentum.
The same replay from that commit with the momentum reset (what a lost or zeroed shard would be) must miss it by
far more, so the check fails if a reshard lost the state. A final accuracy bar and the per-rank state bytes in the
metrics (half of the unsharded state at 2 workers) complete it.

Steps at batch 32 and --commit-every 5 (1437 samples): 2 workers train 64 samples per step, 3 workers 96. Epoch 1:
steps 1-10 at 2 workers (gate 1 after step 10: a host is added, the job resizes at the commit of step 10, sample
640), then 11-19 at 3 (797 samples; 19 is short). Epoch 2 at 3 workers from step 20 (commits 20, 25, 30): the
workers are held after step 28 (gate 2), one is SIGKILLed, the survivors roll back to the commit of step 25 (sample
576) and train the epoch's rest at 2 (steps 26-39). Epoch 3: steps 40-62 at 2.

About 30 s of the job's ~70 s is Gloo's: of the two survivors of a 3-worker job, one sees the dead peer's connection
reset at once, the other waits out HOROVOD_GLOO_TIMEOUT_SECONDS (30 s by default) in a recv before it fails too.
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

TRAIN_SAMPLES, EPOCHS, BATCH, LR, MOMENTUM = 1437, 3, 32, 0.05, 0.9
ADD_AT, KILL_AT, ROLLBACK_TO, WINDOW = 10, 28, 25, 5
EXTRA = ["--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR), "--commit-every", "5",
         "--shard-optimizer"]
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


def replay(before, steps, world, reset_momentum=False):
    """From the commit ``before``, the steps ``steps`` (step -> each rank's ids) at ``world`` workers in one process
    with plain SGD: each rank's mean loss weighted as the trainer weighs it (samples here x world / samples in the
    step), the gradients averaged over ranks, the LR scaled linearly by the world size. Returns (model, optimizer)."""
    from hvdkit.datasets import digits_split
    x, y, _, _ = digits_split()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    model = example_model()
    model.load_state_dict(before["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    optimizer.load_state_dict(before["optimizer"])
    assert optimizer.param_groups[0]["lr"] == LR and optimizer.param_groups[0]["momentum"] == MOMENTUM
    if reset_momentum:
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


def distance(model, optimizer, after):
    """Largest difference to the commit ``after``: (parameters, momentum buffers)."""
    params = max(float((p.detach() - after["model"][name]).abs().max()) for name, p in model.named_parameters())
    want = after["optimizer"]["state"]
    assert sorted(want) == list(range(len(list(model.parameters()))))
    momentum = max(float((optimizer.state[p]["momentum_buffer"] - want[i]["momentum_buffer"]).abs().max())
                   for i, p in enumerate(model.parameters()))
    return params, momentum


def check_carried_over(job, step, world_before, world_after):
    """The resize at the commit of ``step`` (``world_before`` -> ``world_after``) kept the momentum: see the module
    docstring. Returns the distances (kept, reset) for the report."""
    before, after = commit(job, step, world_before), commit(job, step + WINDOW, world_after)
    momentum = before["optimizer"]["state"]
    assert len(momentum) == 6 and all(float(s["momentum_buffer"].abs().max()) > 1e-3 for s in momentum.values())
    steps = trained_ids(job, step + 1, step + WINDOW, world_after)
    assert all(len(ids) == BATCH for each in steps.values() for ids in each), "a short step inside the window"
    kept = distance(*replay(before, steps, world_after), after)
    reset = distance(*replay(before, steps, world_after, reset_momentum=True), after)
    print(f"resize {world_before} -> {world_after} at step {step}: replay from the commit to step {step + WINDOW} "
          f"misses by {kept[0]:.2g} (parameters), {kept[1]:.2g} (momentum); with the momentum reset by "
          f"{reset[0]:.2g}, {reset[1]:.2g}")
    assert max(kept) <= TOLERANCE, (step, kept)
    assert min(reset) > 100 * TOLERANCE, (step, reset)   # the check can tell a reset state apart
    return kept, reset


def wait_second_gate(job, hosts, timeout=180):
    """host -> pid of the workers on ``hosts`` held at the second gate (tests/workers/zero_elastic.py)."""
    def reached():
        names = [n for n in os.listdir(job.gate_dir) if n.startswith("reached2-") and not n.endswith(".tmp")]
        pairs = (n[len("reached2-"):].rsplit("-", 1) for n in names)
        return {host: int(pid) for host, pid in pairs}
    job.wait_for(lambda: set(hosts) <= set(reached()), f"workers on {hosts} at the second gate", timeout)
    return reached()


def test_sharded_job_grows_loses_a_worker_and_keeps_the_momentum(elastic_job, monkeypatch):
    import elastic_harness
    monkeypatch.setattr(elastic_harness, "GATED", os.path.join(WORKERS, "zero_elastic.py"))
    started = time.time()
    added, grown = third_host()
    job = elastic_job("torch", ORIGINAL, np=2, max_np=3, extra=EXTRA, gate_step=ADD_AT,
                      env={"HVDKIT_GATE2_STEP": str(KILL_AT)})
    # event 1: a host added while the 2 workers are held after step 10; the job grows at that step's commit
    job.wait_gate(["localhost", "127.0.0.1"])
    job.change_hosts(grown)
    job.release()
    # event 2: all 3 held after step 28 (epoch 2); the worker on 127.0.0.1 is SIGKILLed, the others roll back
    held = wait_second_gate(job, ["localhost", "127.0.0.1", added])
    assert len({pid for pid in held.values()}) == 3 or added == "localhost", held
    os.kill(held["127.0.0.1"], 9)
    with open(os.path.join(job.gate_dir, "release2"), "w"):
        pass
    rc = job.finish(timeout=240)
    wall = time.time() - started
    assert rc == 0, job.output()[-5000:]

    report = check(job.audit_dir, TRAIN_SAMPLES, EPOCHS)
    assert report["ok"], report["problems"]
    assert report["world_sizes"] == {0: [2, 3], 1: [2, 3], 2: [2]}, report
    assert report["rollbacks"] >= 1, report
    resets = job.resets()
    assert [(r["from"], r["to"], r["rolled_back"], r["epoch"], r["step"]) for r in resets] == \
        [(2, 3, False, 1, ADD_AT), (3, 2, True, 2, ROLLBACK_TO)], resets
    assert resets[0]["sample"] == ADD_AT * 2 * BATCH and resets[1]["sample"] == (ROLLBACK_TO - 19) * 3 * BATCH, resets

    with open(job.metrics) as f:
        metrics = json.load(f)
    assert metrics["world_size"] == 2 and metrics["epochs"] == EPOCHS, metrics
    assert metrics["train_samples_per_epoch"] == TRAIN_SAMPLES and metrics["resets"] == 2, metrics
    assert metrics["global_step"] == 62, metrics
    assert metrics["test_accuracy"] >= 0.9, metrics
    n_params = sum(p.numel() for p in example_model().parameters())
    assert 0 < metrics["optimizer_state_bytes"] <= 4 * -(-n_params // 2), metrics   # one momentum shard of 2
    final = job.manifests()[-1]
    assert final["world_size"] == 2 and final["global_step"] == 62, final

    grew = check_carried_over(job, ADD_AT, 2, 3)              # 3 shards cut from the state of 2 (in memory, joined)
    shrank = check_carried_over(job, ROLLBACK_TO, 3, 2)       # 2 shards cut from the commit of 3 (rollback)
    print(f"zero elastic: {wall:.0f} s, test accuracy {metrics['test_accuracy']:.4f}, "
          f"{metrics['optimizer_state_bytes']} optimizer-state bytes per rank; replays {grew} {shrank}")
