"""``hvdkit bench``: side-by-side measurements against the peers, run under the launchers they need.

- ``hvdkit bench allreduce``: bus bandwidth of float32 allreduce, 4 KiB - 64 MiB, 2 ranks: hvdkit's
  default Horovod settings, Horovod MPI ops, Horovod Gloo ops, mpi4py, torch.distributed (gloo),
  and one-process memcpy as the physical reference.
- ``hvdkit bench train``: samples/s at 1 and 2 workers of one small CNN: hvdkit torch vs a raw
  Horovod torch loop vs torch DDP; hvdkit Keras vs a raw Horovod TF loop vs TF
  MultiWorkerMirroredStrategy (tf_keras, in its own processes).

Results go to a folder as a markdown table, a JSON file and a PNG plot.

Example::

    hvdkit bench allreduce --out results/bench
    hvdkit bench train --repeats 3 --out results/bench
"""
