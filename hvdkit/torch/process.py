"""The process role for PyTorch: Horovod's torch collectives, or none at all at world size 1.

Besides the trainer's collectives (``hvdkit.process.Process``) the torch adapter asks its process for
tensor-level ones: wrap the optimizer so gradients are averaged, broadcast the model, tell a lost peer from a
user error (Horovod raises typed exceptions for that in torch), and for the sharded optimizer
(``hvdkit.torch.zero``) an averaging reduce-scatter and an allgather of flat vectors.

Example::

    process = HorovodProcess()          # in a job started by horovodrun or mpirun
    process.init(seed=0, threads=1)
    optimizer = process.distributed_optimizer(optimizer, model.named_parameters())
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .. import process as core
from ..tuning import apply_defaults
from .buckets import DEFAULT_BUCKET_BYTES, GradientBuckets


def _pin_and_seed(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable before the first parallel op; keep what the user chose
        pass
    torch.manual_seed(seed)


def is_peer_lost(error: BaseException) -> bool:
    """True when ``error`` means a peer vanished mid-collective (roll back), False for any other error.

    horovod.torch raises ``HorovodInternalError`` for a failed collective; nothing else is a lost peer.
    """
    from horovod.common.exceptions import HorovodInternalError
    return isinstance(error, HorovodInternalError)


class HorovodProcess(core.HorovodObjects, core.Process):
    """``horovod.torch``: the process a launched torch job uses."""

    def init(self, seed: int, threads: int) -> None:
        import horovod.torch as hvd
        apply_defaults()  # hvdkit's measured Horovod settings, unless the user set them
        core.apply_stall_defaults()  # a rank stuck outside the collectives ends the job (hvdkit.process)
        hvd.init()
        self.hvd = hvd
        _pin_and_seed(seed, threads)

    is_peer_lost = staticmethod(is_peer_lost)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        if self.alone():   # the sharded step's norm, each step
            return np.array(values, dtype=np.float64)
        tensor = torch.from_numpy(np.asarray(values, dtype=np.float64).copy())
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name="hvdkit.metrics").numpy()

    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        import horovod.torch.elastic
        # retries on HorovodInternalError only (see is_peer_lost), never forever from one commit
        return horovod.torch.elastic.run(core.guard_rollbacks(fn, self))

    # ---- for the adapter ------------------------------------------------------------------------
    def distributed_optimizer(self, optimizer, named_parameters, compression: str = "none",
                              accumulation: int = 1, op: str = "average"):
        if self.alone():
            return optimizer   # the gradients are the average already (fp16 compression: no rounding either)
        hvd = self.hvd
        return hvd.DistributedOptimizer(
            optimizer, named_parameters=named_parameters,
            compression=hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none,
            backward_passes_per_step=accumulation, op=hvd.Adasum if op == "adasum" else hvd.Average)

    def gradient_buckets(self, parameters, compression: str = "none", bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        """A :class:`~hvdkit.torch.buckets.GradientBuckets` averaging ``parameters``' gradients over ranks with
        one grouped allreduce per bucket; None at one rank (the gradients are the average already)."""
        if self.alone():
            return None
        hvd = self.hvd
        return GradientBuckets(parameters, launch=lambda tensors, name: hvd.grouped_allreduce_async_(
            tensors, op=hvd.Average, name=name), wait=hvd.synchronize, compression=compression,
            bucket_bytes=bucket_bytes)

    def broadcast_parameters(self, state_dict) -> None:
        self.hvd.broadcast_parameters(state_dict, root_rank=0)

    def average_tensors(self, tensors) -> None:
        """In place, every tensor the mean over ranks (one grouped allreduce; BatchNorm running statistics)."""
        if tensors and not self.alone():
            self.hvd.grouped_allreduce_(list(tensors), op=self.hvd.Average, name="hvdkit.buffers")

    def reducescatter_average(self, tensors, compression: str = "none", name: str = "hvdkit.zero.grads"):
        """For 1-D tensors of equal length on every rank, each a multiple of the world size: each averaged over
        ranks, and this rank's contiguous ``1/size`` slice of it (rank r: the r-th); one grouped collective."""
        if self.alone():
            return list(tensors)
        hvd = self.hvd
        return hvd.grouped_reducescatter(
            list(tensors), op=hvd.Average, name=name,
            compression=hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none)

    def allgather_tensors(self, tensors, name: str = "hvdkit.zero.gather"):
        """For 1-D tensors (the same count on every rank): each rank's concatenated in rank order; one grouped
        collective."""
        if self.alone():
            return list(tensors)
        return self.hvd.grouped_allgather(list(tensors), name=name)


class LocalProcess(core.LocalProcess):
    """World size 1 without Horovod: the optimizer is used as given, broadcasts do nothing."""

    def init(self, seed: int, threads: int) -> None:
        _pin_and_seed(seed, threads)

    def distributed_optimizer(self, optimizer, named_parameters, compression: str = "none",
                              accumulation: int = 1, op: str = "average"):
        return optimizer  # one rank: the gradients are already the average

    def gradient_buckets(self, parameters, compression: str = "none", bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        return None

    def broadcast_parameters(self, state_dict) -> None:
        pass

    def average_tensors(self, tensors) -> None:
        pass

    def reducescatter_average(self, tensors, compression: str = "none", name: str = "hvdkit.zero.grads"):
        return list(tensors)   # one rank: the average, and the whole vector is its slice

    def allgather_tensors(self, tensors, name: str = "hvdkit.zero.gather"):
        return list(tensors)
