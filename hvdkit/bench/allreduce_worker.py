"""One rank of ``hvdkit bench allreduce``: one implementation (one row), in processes of its own.

argv: OUT_JSON SIZES_CSV ITERS IMPL. Rank 0 writes {"world_size", "results": {bytes: seconds}, "ran_with": ...,
"memcpy_seconds"} (memcpy: mpi4py's row only, one process, the largest size). In place everywhere, as gradients are
reduced: comparing out-of-place with in-place is unfair. Each row runs in its own job whose environment the driver
built from a clean base (``hvdkit.bench.run``), so no setting of one row reaches another; ``ran_with`` is read back
from the frameworks here (threads, Horovod's controller and CPU tensor operations; with ``--probe-ops`` also the
operations Horovod's timeline shows for one more allreduce after the measurement).

IMPL: ``mpi4py``, ``torch.distributed gloo`` (mpirun); ``horovod mpi ops`` (mpirun); ``horovod gloo ops``
(horovodrun: Gloo tensor ops need the Gloo controller, under the MPI one they crash in this build); ``hvdkit
(mpirun)`` and ``hvdkit (horovodrun)``: Horovod as hvdkit's torch process starts it (its tuned defaults, its thread
pinning), under mpirun and under horovodrun --gloo (what ``hvdkit launch`` runs for elastic jobs).
"""
import json
import os
import sys
import time

import numpy as np

from hvdkit.bench.models import horovod_collectives, pin_torch_threads, ran_with

IMPLS = ("mpi4py", "torch.distributed gloo", "horovod mpi ops", "horovod gloo ops", "hvdkit (mpirun)",
         "hvdkit (horovodrun)")


def timed(op, barrier, iters):
    """Median seconds of ``op`` over ``iters`` runs after 2 warm-ups, ranks aligned by ``barrier``."""
    for _ in range(2):
        op()
    samples = []
    for _ in range(iters):
        barrier()
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def horovod(impl, sizes, iters):
    import horovod.torch as hvd
    import torch
    if impl.startswith("hvdkit"):
        from hvdkit.torch.process import HorovodProcess
        HorovodProcess().init(seed=0, threads=1)   # the kit's own start: its defaults, its threads, then hvd.init()
    else:
        hvd.init()
        pin_torch_threads(1)
    tensors = {n: torch.ones(n // 4) for n in sizes}
    result = {n: timed(lambda t=tensors[n]: hvd.allreduce_(t, op=hvd.Sum, name=f"b{n}"),
                       lambda: hvd.allreduce(torch.zeros(1), name="barrier"), iters) for n in sizes}
    rank, world = hvd.rank(), hvd.size()
    ran = ran_with("torch", None, horovod_collectives(hvd, lambda: hvd.allreduce(torch.zeros(1), name="probe"), rank))
    hvd.shutdown()
    return result, rank, world, ran


def main():
    out, sizes, iters, impl = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
    if impl not in IMPLS:
        raise SystemExit(f"unknown implementation {impl!r}; one of {', '.join(IMPLS)}")
    memcpy = None
    if impl in ("mpi4py", "torch.distributed gloo"):
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        library = MPI.Get_library_version().split(",")[0].strip()   # e.g. "Open MPI v4.1.4"
    if impl == "mpi4py":
        buffers = {n: np.ones(n // 4, dtype=np.float32) for n in sizes}
        result = {n: timed(lambda b=buffers[n]: comm.Allreduce(MPI.IN_PLACE, b), comm.Barrier, iters) for n in sizes}
        ran = ran_with(None, None, {"backend": f"MPI ({library})"})
        if rank == 0:   # the physical reference: one process copying the largest buffer (the other rank is done)
            big = np.ones(max(sizes) // 4, dtype=np.float32)
            dst = np.empty_like(big)
            memcpy = timed(lambda: np.copyto(dst, big), lambda: None, iters)
    elif impl == "torch.distributed gloo":
        import torch.distributed as dist
        pin_torch_threads(1)
        port = comm.bcast(int(os.environ.get("HVDKIT_BENCH_PORT", "29533")), root=0)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        import torch
        tensors = {n: torch.ones(n // 4) for n in sizes}
        result = {n: timed(lambda t=tensors[n]: dist.all_reduce(t), dist.barrier, iters) for n in sizes}
        ran = ran_with("torch", None, {"backend": f"torch.distributed {dist.get_backend()}"})
        dist.destroy_process_group()
    else:
        result, rank, world, ran = horovod(impl, sizes, iters)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"impl": impl, "world_size": world, "results": result, "ran_with": ran,
                       "memcpy_seconds": memcpy}, f)


if __name__ == "__main__":
    main()
