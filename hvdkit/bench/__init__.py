"""``hvdkit bench``: side-by-side measurements against the peers, run under the launchers they need.

- ``hvdkit bench allreduce``: bus bandwidth of float32 allreduce, 4 KiB - 64 MiB, 2 ranks: hvdkit under
  horovodrun and under mpirun, Horovod MPI ops, Horovod Gloo ops, mpi4py, torch.distributed (gloo),
  and one-process memcpy as the physical reference.
- ``hvdkit bench train``: samples/s at 1 and 2 workers of one small CNN: hvdkit torch vs a raw
  Horovod torch loop vs torch DDP; hvdkit Keras vs a raw Horovod TF loop vs TF
  MultiWorkerMirroredStrategy (tf_keras, in its own processes).
- ``hvdkit bench zero``: the sharded optimizer vs unsharded vs torch's ZeroRedundancyOptimizer at 1-3 workers.

Results go to a folder as a markdown table, a JSON file and a PNG plot.

Example::

    hvdkit bench allreduce --out results/bench
    hvdkit bench train --rounds 3 --out results/bench
    hvdkit bench zero --rounds 2 --out results/bench

Every row runs in its own processes with an environment built from a clean base and reports the threads and
collectives it read back (docs/bench/README.md).
"""
