"""One rank of ``hvdkit bench allreduce``: some implementations, one after another, on the same buffers.

argv: OUT_JSON SIZES_CSV ITERS IMPLS_CSV. Rank 0 writes {"results": {impl: {bytes: seconds}}}.
In place everywhere, as gradients are reduced: comparing out-of-place with in-place is unfair.
Under mpirun: mpi4py, torch.distributed gloo, horovod mpi ops, hvdkit default. Under horovodrun
(Gloo controller): horovod gloo ops (Gloo ops under the MPI controller crash in this build).
"""
import json
import os
import sys
import time

import numpy as np

from hvdkit.tuning import HOROVOD_DEFAULTS


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


def horovod(sizes, iters, env):
    import horovod.torch as hvd
    import torch
    os.environ.update(env)
    hvd.init()
    tensors = {n: torch.ones(n // 4) for n in sizes}
    result = {n: timed(lambda t=tensors[n]: hvd.allreduce_(t, op=hvd.Sum, name=f"b{n}"),
                       lambda: hvd.allreduce(torch.zeros(1), name="barrier"), iters) for n in sizes}
    rank, world = hvd.rank(), hvd.size()
    hvd.shutdown()
    return result, rank, world


def main():
    out, sizes, iters, impls = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4].split(",")
    results, rank, world = {}, 0, 1
    if "mpi4py" in impls or "torch.distributed gloo" in impls:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
    if "mpi4py" in impls:
        buffers = {n: np.ones(n // 4, dtype=np.float32) for n in sizes}
        results["mpi4py"] = {n: timed(lambda b=buffers[n]: comm.Allreduce(MPI.IN_PLACE, b), comm.Barrier, iters)
                             for n in sizes}
    if "torch.distributed gloo" in impls:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        port = comm.bcast(int(os.environ.get("HVDKIT_BENCH_PORT", "29533")), root=0)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        tensors = {n: torch.ones(n // 4) for n in sizes}
        results["torch.distributed gloo"] = {n: timed(lambda t=tensors[n]: dist.all_reduce(t), dist.barrier, iters)
                                             for n in sizes}
        dist.destroy_process_group()
    for name, env in (("horovod mpi ops", {"HOROVOD_CPU_OPERATIONS": "mpi"}),
                      ("horovod gloo ops", {"HOROVOD_CPU_OPERATIONS": "gloo"}),
                      ("hvdkit default", dict(HOROVOD_DEFAULTS))):
        if name in impls:
            results[name], rank, world = horovod(sizes, iters, env)
    if rank == 0:
        big = np.ones(max(sizes) // 4, dtype=np.float32)
        dst = np.empty_like(big)
        results["memcpy (1 process)"] = {max(sizes): timed(lambda: np.copyto(dst, big), lambda: None, iters)}
        with open(out, "w") as f:
            json.dump({"world_size": world, "results": results}, f)


if __name__ == "__main__":
    main()
