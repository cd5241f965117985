"""One rank of ``hvdkit bench zero`` (run under horovodrun): one way of holding Adam's state, on one model.

argv: VARIANT OUT_JSON STEPS BATCH MODEL WIDTH DEPTH. VARIANT one of
``hvdkit`` (hvdkit's Trainer, every rank holds all of Adam's state), ``hvdkit-sharded`` (the same with
``shard_optimizer=True``: ZeRO stage 2 on Horovod's reduce-scatter and allgather) and ``torch-zero``
(``torch.distributed.optim.ZeroRedundancyOptimizer`` over torch DDP on gloo: ZeRO stage 1, whole parameters per
rank). MODEL ``mlp`` (Flatten, 784 -> WIDTH, DEPTH x WIDTH -> WIDTH, -> 10, ReLU between) or ``cnn`` (the small CNN
of every other benchmark, ``hvdkit.bench.models.torch_cnn``). Synthetic 28x28 images, BATCH per worker, one compute
thread per worker, one warm-up pass of STEPS steps then one timed pass of STEPS steps.

Every rank measures from the tensors it holds, right after its last optimizer step:

- ``state_bytes``: the optimizer state (every tensor in the stepping optimizer's ``state``; the sharded optimizer's
  inner shard state, plus its gathered unsharded copy if one were held then);
- ``grad_bytes_after_step``: gradients still held (model ``.grad`` and the shards' ``.grad``);
- ``grad_bytes_at_step``: the most gradient bytes held while an optimizer stepped (a global step pre-hook): the
  reduced gradients the update reads (the whole model's, or this rank's shard);
- ``peak_rss_bytes``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` right after the last step;

each counted once per storage (a DDP gradient is a view into its bucket: the bucket counts). Rank 0 writes
``{"variant", "world_size", "samples_per_sec", "ranks": [per-rank dict], "params", ...}``.
"""
import json
import os
import resource
import sys
import time

from hvdkit.datasets import synthetic_images

VARIANTS = ("hvdkit", "hvdkit-sharded", "torch-zero")
LR = 1e-3


def build_model(kind: str, width: int, depth: int):
    from hvdkit.bench.models import torch_cnn, torch_mlp
    return torch_cnn() if kind == "cnn" else torch_mlp(width, depth)


def unique_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors`` (None and non-tensors skipped), each storage once."""
    import torch
    storages = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def state_tensors(state) -> list:
    """The tensors in an optimizer's ``state`` (``{param: {key: value}}``)."""
    return [v for entry in state.values() for v in entry.values()]


class Meter:
    """Gradient bytes held while any optimizer steps (the max over steps), and the per-rank record."""

    def __init__(self, model):
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        self.model_params = list(model.parameters())
        self.grad_at_step = 0
        register_optimizer_step_pre_hook(self._at_step)   # every optimizer's step, Horovod's and ZeRO's inner too

    def _grads(self, optimizer=None) -> int:
        params = list(self.model_params)
        if optimizer is not None:
            params += [p for group in optimizer.param_groups for p in group["params"]]
        return unique_bytes(p.grad for p in params)

    def _at_step(self, optimizer, args, kwargs) -> None:
        self.grad_at_step = max(self.grad_at_step, self._grads(optimizer))

    def record(self, state: list, extra_grad_holders=()) -> dict:
        grads = unique_bytes([p.grad for p in self.model_params] + [p.grad for p in extra_grad_holders])
        with open("/proc/self/statm") as f:
            rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"state_bytes": unique_bytes(state), "grad_bytes_after_step": grads,
                "grad_bytes_at_step": self.grad_at_step, "rss_bytes_after_step": rss_now}


def finish(record: dict) -> dict:
    return dict(record, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def write(out: str, variant: str, world: int, samples_per_sec: float, ranks: list, model, **extra) -> None:
    params = list(model.parameters())
    with open(out + ".tmp", "w") as f:
        json.dump({"variant": variant, "world_size": world, "samples_per_sec": samples_per_sec, "ranks": ranks,
                   "params": sum(p.numel() for p in params), "largest_param": max(p.numel() for p in params),
                   "param_tensors": len(params), **extra}, f)
    os.replace(out + ".tmp", out)


def hvdkit_variant(out: str, sharded: bool, steps: int, batch: int, kind: str, width: int, depth: int) -> None:
    import torch
    from hvdkit import TrainConfig, Trainer
    from hvdkit.callbacks import Callback
    from hvdkit.torch import TorchAdapter
    world = int(os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    x, y = synthetic_images(steps * batch * world, seed=0)
    torch.manual_seed(0)
    model = build_model(kind, width, depth)
    meter = Meter(model)
    adapter = TorchAdapter(model, torch.optim.Adam(model.parameters(), lr=LR), torch.nn.functional.cross_entropy)
    last = 2 * steps

    class Measure(Callback):
        all_ranks = True
        record = None

        def on_step_end(self, trainer, global_step, loss):
            if global_step == last:   # right after the last optimizer step, before the epoch's end
                zero = adapter._sharded
                if zero is None:
                    self.record = meter.record(state_tensors(adapter.optimizer.state))
                else:
                    gathered = state_tensors(zero._gathered[1]) if zero._gathered is not None else []
                    self.record = dict(meter.record(state_tensors(zero.inner.state) + gathered, zero.masters),
                                       master_bytes=unique_bytes(zero.masters))
                # the peak here, as the torch variant's after its last step: the end of fit gathers the sharded
                # state once more (for a next fit), which is not the training's footprint
                self.record = finish(self.record)

        def on_train_end(self, trainer, result):   # every rank, before the run's last collective
            self.ranks = trainer.process.allgather_object(self.record)
            self.rank = trainer.process.rank

    measure = Measure()
    config = TrainConfig(epochs=2, batch_size=batch, progress_bar=False, threads=1, shard_optimizer=sharded)
    result = Trainer(adapter, config, [measure]).fit((x, y))
    if measure.rank == 0:
        write(out, "hvdkit-sharded" if sharded else "hvdkit", result.world_size,
              result.history[-1]["samples_per_sec"], measure.ranks, model,
              hvdkit_optimizer_state_bytes=result.optimizer_state_bytes)


def torch_zero(out: str, steps: int, batch: int, kind: str, width: int, depth: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    torch.set_num_threads(1)
    rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    world = int(os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ.get('HVDKIT_BENCH_PORT', '29536')}",
                            rank=rank, world_size=world)
    x, y = synthetic_images(steps * batch * world, seed=0)
    xs, ys = torch.from_numpy(x[rank::world]), torch.from_numpy(y[rank::world])
    torch.manual_seed(0)
    model = build_model(kind, width, depth)
    meter = Meter(model)
    # gradient_as_bucket_view: the .grad are DDP's buckets (otherwise DDP keeps a second copy no tensor here shows)
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=LR * world)
    loss_fn = torch.nn.functional.cross_entropy

    def one_pass():
        for s in range(steps):
            optimizer.zero_grad()
            loss_fn(ddp(xs[s * batch:(s + 1) * batch]), ys[s * batch:(s + 1) * batch]).backward()
            optimizer.step()
    one_pass()
    dist.barrier()
    start = time.perf_counter()
    one_pass()
    samples_per_sec = steps * batch * world / (time.perf_counter() - start)
    record = finish(meter.record(state_tensors(optimizer.optim.state)))
    ranks = [None] * world
    dist.all_gather_object(ranks, record)
    if rank == 0:
        write(out, "torch-zero", world, samples_per_sec, ranks, model)
    dist.barrier()
    dist.destroy_process_group()


def main(argv) -> None:
    variant, out, steps, batch, kind, width, depth = argv
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    steps, batch, width, depth = int(steps), int(batch), int(width), int(depth)
    if variant == "torch-zero":
        torch_zero(out, steps, batch, kind, width, depth)
    else:
        hvdkit_variant(out, variant == "hvdkit-sharded", steps, batch, kind, width, depth)


if __name__ == "__main__":
    main(sys.argv[1:])
