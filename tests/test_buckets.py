"""Gradient buckets (hvdkit.torch.buckets) in one process: which parameters go together, when each bucket is
launched during backward, accumulation, unused parameters, fp16 on the wire, and the torch adapter's choice of
reducer. The allreduce is a recorder here (one rank: the average is the identity, so every number must come out
as plain torch's); the 2-worker runs in tests/test_zoo_parallel.py ("reducers") compare the buckets with
Horovod's DistributedOptimizer on real collectives.
"""
import numpy as np
import pytest

from hvdkit import HvdkitError, TrainConfig, Trainer

torch = pytest.importorskip("torch")
from hvdkit.torch import LocalProcess, TorchAdapter  # noqa: E402
from hvdkit.torch.buckets import GradientBuckets, plan_buckets  # noqa: E402


def cnn(seed=0, dropout=0.2):
    """Conv-BN-ReLU-pool, conv, two linear layers, dropout: 10 parameter tensors, 0.1 MB of gradients."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 3))


class Recorder:
    """launch/wait for GradientBuckets: records each launch (name, dtypes, and how many of the model's
    parameters had no gradient yet, i.e. whether backward was still running)."""

    def __init__(self, model=None):
        self.model, self.launches, self.waited = model, [], []

    def launch(self, tensors, name):
        pending = sum(p.grad is None for p in self.model.parameters()) if self.model is not None else None
        self.launches.append({"name": name, "dtypes": {t.dtype for t in tensors}, "no_grad_yet": pending,
                              "sizes": [t.numel() for t in tensors]})
        return name

    def wait(self, handle):
        self.waited.append(handle)


def buckets_for(model, bucket_bytes, compression="none"):
    rec = Recorder(model)
    return GradientBuckets(list(model.parameters()), rec.launch, rec.wait, compression=compression,
                           bucket_bytes=bucket_bytes), rec


def backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def test_plan_is_reverse_order_cut_at_the_cap():
    params = [torch.zeros(n) for n in (10, 300, 20, 30, 5)]   # float32: 40, 1200, 80, 120, 20 bytes
    buckets = plan_buckets(params, bucket_bytes=200)
    assert [[p.numel() for p in b] for b in buckets] == [[5, 30], [20], [300], [10]]
    # a tensor larger than the cap is a bucket of its own; one big cap takes everything
    assert [[p.numel() for p in b] for b in plan_buckets(params, 1 << 20)] == [[5, 30, 20, 300, 10]]


def test_buckets_go_out_during_backward_last_layer_first():
    model = cnn()
    buckets, rec = buckets_for(model, bucket_bytes=8 << 10)
    assert len(buckets.buckets) >= 3
    buckets.arm()
    backward(model)
    # every bucket launched from the hooks, in reverse layer order, the first while backward still had
    # gradients to compute (the earlier layers'), which is the overlap
    assert [r["name"] for r in rec.launches] == [f"hvdkit.grads.{i}" for i in range(len(buckets.buckets))]
    assert rec.launches[0]["no_grad_yet"] > 0 and rec.launches[-1]["no_grad_yet"] == 0
    assert rec.launches[0]["sizes"][0] == 3   # the last Linear's bias
    buckets.synchronize()
    assert rec.waited == [r["name"] for r in rec.launches]


def test_not_armed_accumulates_without_launching_then_one_launch_per_bucket():
    model = cnn()
    buckets, rec = buckets_for(model, bucket_bytes=8 << 10)
    backward(model, seed=1)                      # an earlier micro-batch: local accumulation only
    assert rec.launches == []
    buckets.arm()
    backward(model, seed=2)
    assert len(rec.launches) == len(buckets.buckets)
    buckets.synchronize()
    # next step: counts reset, the hooks launch again only once armed
    model.zero_grad()
    backward(model, seed=3)
    assert len(rec.launches) == len(buckets.buckets)
    buckets.arm()
    backward(model, seed=4)
    buckets.synchronize()
    assert len(rec.launches) == 2 * len(buckets.buckets)


def test_unused_parameter_joins_with_a_zero_gradient_at_synchronize():
    model = cnn()
    extra = torch.nn.Parameter(torch.ones(7))   # held, never used by the forward pass
    rec = Recorder(model)
    buckets = GradientBuckets(list(model.parameters()) + [extra], rec.launch, rec.wait, bucket_bytes=1 << 20)
    buckets.arm()
    backward(model)
    assert rec.launches == []                    # its bucket waits for the unused parameter
    buckets.synchronize()
    assert len(rec.launches) == 1 and 7 in rec.launches[0]["sizes"]
    assert torch.equal(extra.grad, torch.zeros(7))


def test_fp16_travels_as_float16_and_comes_back_float32_rounded():
    model = cnn()
    buckets, rec = buckets_for(model, bucket_bytes=1 << 20, compression="fp16")
    buckets.arm()
    backward(model)
    exact = [p.grad.clone() for p in model.parameters()]
    buckets.synchronize()
    assert rec.launches[0]["dtypes"] == {torch.float16}
    for p, g in zip(model.parameters(), exact):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, g.to(torch.float16).to(torch.float32))
    assert any(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), exact))   # rounding happened


def test_a_step_that_raised_is_forgotten():
    model = cnn()
    buckets, rec = buckets_for(model, bucket_bytes=8 << 10)
    buckets.arm()
    backward(model)                              # launched, never synchronized (a lost peer raised)
    buckets.reset()
    model.zero_grad()
    buckets.arm()
    backward(model)
    buckets.synchronize()
    assert len(rec.launches) == 2 * len(buckets.buckets)
    assert rec.waited == [r["name"] for r in rec.launches[len(buckets.buckets):]]


def test_a_gradient_arriving_twice_in_one_pass_is_refused():
    # a layer run twice under reentrant checkpointing gets two gradient hooks in one backward pass: its bucket
    # would go out after the first with the rest as zeros, and the second gradient land in a tensor on the wire
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    first, shared, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    params = [*first.parameters(), *shared.parameters(), *head.parameters()]
    rec = Recorder()
    buckets = GradientBuckets(params, rec.launch, rec.wait, bucket_bytes=1 << 20)
    buckets.arm()
    h = first(torch.randn(3, 4))
    for _ in range(2):
        h = checkpoint(shared, h, use_reentrant=True)
    with pytest.raises(HvdkitError, match="got its gradient twice in one backward pass"):
        head(h).sum().backward()
    buckets.reset()                               # the adapter forgets the step that raised
    for p in params:
        p.grad = None
    buckets.arm()
    h = first(torch.randn(3, 4))
    head(checkpoint(shared, h, use_reentrant=False)).sum().backward()   # once per pass: fine
    buckets.synchronize()
    assert len(rec.launches) == 1 and rec.launches[0]["sizes"] == [p.numel() for p in reversed(params)]


# ---- the adapter: which reducer, and the numbers of plain torch -------------------------------------------------
class TwoRanksInOneProcess(LocalProcess):
    """LocalProcess, but the adapter asks it for gradient buckets as it would at 2 ranks; the allreduce is the
    identity (the other rank's gradients equal this one's)."""

    def __init__(self):
        self.recorder = Recorder()

    def gradient_buckets(self, parameters, compression="none", bucket_bytes=None):
        return GradientBuckets(parameters, self.recorder.launch, self.recorder.wait, compression=compression,
                               bucket_bytes=8 << 10)


DATA_X = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)
DATA_Y = np.random.default_rng(1).integers(0, 3, size=40).astype(np.int64)


def plain_torch(accumulation, clip):
    model = cnn(dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    from hvdkit.sharding import plan_epoch
    for step in plan_epoch(40, 0, 1, 4, 0, 0, accumulation):
        opt.zero_grad()
        for ids, weight in zip(step.micro_batches, step.weights):
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(DATA_X[ids])), torch.from_numpy(DATA_Y[ids]))
            (loss * weight).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


@pytest.mark.parametrize("accumulation,clip", [(1, None), (2, 0.5)])
def test_adapter_with_buckets_trains_as_plain_torch(accumulation, clip):
    model = cnn(dropout=0.0)   # BatchNorm, no dropout: the trainer seeds each rank's own stream
    process = TwoRanksInOneProcess()
    adapter = TorchAdapter(model, torch.optim.Adam(model.parameters(), lr=0.01), torch.nn.functional.cross_entropy,
                           reducer="buckets")
    cfg = TrainConfig(epochs=1, batch_size=4, accumulation=accumulation, clip_grad_norm=clip, progress_bar=False,
                      lr_scaling="none", seed=0)
    result = Trainer(adapter, cfg, process=process).fit((DATA_X, DATA_Y))
    ref = plain_torch(accumulation, clip)
    assert adapter._buckets is not None and not hasattr(adapter.optimizer, "synchronize")
    # one launch per bucket per optimizer step, however many micro-batches
    assert len(process.recorder.launches) == result.global_step * len(adapter._buckets.buckets)
    diff = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert diff < 1e-6


def test_a_step_that_raised_leaves_no_hook_armed():
    # armed hooks left behind would launch from the next backward pass, even one of another adapter's first
    # micro-batch, under the same bucket names
    model = cnn(dropout=0.0)
    process = TwoRanksInOneProcess()
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected in the second step")
        return torch.nn.functional.cross_entropy(outputs, targets)
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, reducer="buckets")
    cfg = TrainConfig(epochs=1, batch_size=4, progress_bar=False, lr_scaling="none", seed=0)
    with pytest.raises(Exception, match="injected in the second step"):
        Trainer(adapter, cfg, process=process).fit((DATA_X, DATA_Y))
    launched = len(process.recorder.launches)
    assert launched == len(adapter._buckets.buckets)   # the first step's
    model.zero_grad()
    backward(model)
    assert len(process.recorder.launches) == launched


def test_adasum_and_sparse_gradients_keep_horovods_wrapper_and_a_bad_reducer_is_refused():
    model = cnn()
    default = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy)
    default.process = TwoRanksInOneProcess()
    default.prepare(lr_factor=1.0, accumulation=1)
    assert default.reducer == "horovod" and default._buckets is None   # buckets only when asked for
    for op in ("average", "adasum"):
        adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy,
                               op=op, reducer="buckets")
        adapter.process = TwoRanksInOneProcess()
        adapter.prepare(lr_factor=1.0, accumulation=1)
        assert (adapter._buckets is not None) == (op == "average")
        adapter._buckets and adapter._buckets.remove()
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    adapter = TorchAdapter(emb, torch.optim.SGD(emb.parameters(), lr=0.1), torch.nn.functional.cross_entropy,
                           reducer="buckets")
    adapter.process = TwoRanksInOneProcess()
    adapter.prepare(lr_factor=1.0, accumulation=1)
    assert adapter._buckets is None
    with pytest.raises(HvdkitError, match="unknown reducer 'ring'; use one of horovod, buckets"):
        TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy,
                     reducer="ring")


def test_prepared_again_keeps_one_set_of_hooks():
    model = cnn()
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy,
                           reducer="buckets")
    adapter.process = TwoRanksInOneProcess()
    for _ in range(2):
        adapter.prepare(lr_factor=1.0, accumulation=1)
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
