"""Gradient buckets: the averaging allreduce of a step's gradients, launched bucket by bucket during backward.

Horovod's ``DistributedOptimizer`` launches one allreduce per parameter from its gradient hook; its background
thread then negotiates whichever are ready at each cycle. Here the parameters are cut, in reverse order (about the
order backward produces their gradients, as DDP does), into buckets of about ``bucket_bytes``; when the last
gradient of a bucket is ready a hook launches one grouped allreduce for the whole bucket (one negotiation, one
fused buffer), which runs while backward goes on. :meth:`synchronize` waits for them all. Opt-in
(``TorchAdapter(reducer="buckets")``): measured as fast as Horovod's hooks on the bench CNN and 0.84x on a wide
MLP, where Horovod fuses large gradients across hooks (docs/bench/buckets).

Same numbers as Horovod's wrapper: every gradient is the element-wise average over ranks (fp16 compression:
cast to float16 for the wire and back). Dense gradients only: the adapter keeps Horovod's wrapper for sparse
ones (``Embedding(sparse=True)``) and for Adasum.

Example::

    buckets = GradientBuckets(params, launch=lambda ts, name: hvd.grouped_allreduce_async_(ts, op=hvd.Average,
                              name=name), wait=hvd.synchronize)
    buckets.arm()             # before the backward pass that ends the step (the last micro-batch's)
    loss.backward()           # buckets go out as their gradients are ready
    buckets.synchronize()     # every .grad is now the average over ranks
    optimizer.step()
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch

from ..errors import HvdkitError

#: Small enough that a model's large late-layer gradients go out while backward still computes the early layers:
#: on the bench CNN (0.84 MB of gradients in 8 tensors) 1 MiB made one bucket, launched only when backward ended,
#: and ran 0.72x Horovod's per-tensor hooks; 256 KiB (3 buckets) 0.92-1.09x, as fast (docs/bench/buckets).
DEFAULT_BUCKET_BYTES = 256 << 10


def plan_buckets(parameters: Sequence[torch.Tensor], bucket_bytes: int) -> List[List[torch.Tensor]]:
    """``parameters`` in reverse order, cut into consecutive runs of at most ``bucket_bytes`` (a larger tensor is a
    bucket of its own). Every rank plans the same buckets from the same model, so bucket ``i`` is one collective."""
    buckets: List[List[torch.Tensor]] = []
    size = 0
    for p in reversed(list(parameters)):
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class GradientBuckets:
    """Averages the gradients of ``parameters`` over ranks, a bucket at a time, from their gradient hooks.

    launch(tensors, name) -> handle: start an in-place averaging allreduce of ``tensors`` as one group.
    wait(handle): block until it is done.
    compression: "none" or "fp16" (each bucket's gradients travel as float16; written back in their own dtype).
    Hooks only launch after :meth:`arm` (the last backward pass of a step: earlier micro-batches accumulate
    locally). A bucket whose gradients never came (a parameter unused this step, on this rank or all) goes out at
    :meth:`synchronize`, its missing gradients as zeros, so every rank runs the same collectives.
    """

    def __init__(self, parameters: Sequence[torch.Tensor], launch: Callable[[List[torch.Tensor], str], Any],
                 wait: Callable[[Any], Any], compression: str = "none", bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        params = [p for p in parameters if p.requires_grad]
        if len({id(p) for p in params}) != len(params):
            params = list({id(p): p for p in params}.values())   # a parameter held twice is reduced once
        self.buckets = plan_buckets(params, bucket_bytes)
        self._launch, self._wait, self._compression = launch, wait, compression
        self._bucket_of: Dict[int, int] = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._left = [len(b) for b in self.buckets]
        self._seen: set = set()                 # ids of the parameters whose gradient came in this armed pass
        self._pending: Dict[int, Any] = {}      # bucket -> (handle, tensors on the wire)
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def arm(self) -> None:
        """The next backward pass ends the step: launch each bucket as soon as its gradients are in."""
        self._armed = True

    def _ready(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        if id(param) in self._seen:
            # its bucket may be on the wire already: a second gradient would be added into a tensor being reduced
            # (as Horovod's wrapper and DDP, refuse it)
            raise HvdkitError(f"a {tuple(param.shape)} parameter got its gradient twice in one backward pass (a "
                              "module run twice under reentrant checkpointing?), which gradient buckets cannot "
                              "average; use reducer='horovod' with backward_passes_per_step, or non-reentrant "
                              "checkpointing (use_reentrant=False)")
        self._seen.add(id(param))
        i = self._bucket_of[id(param)]
        self._left[i] -= 1
        if self._left[i] == 0 and i not in self._pending:
            self._start(i)

    def reset(self) -> None:
        """Forget a step that did not finish (it raised between :meth:`arm` and :meth:`synchronize`)."""
        if self._pending or self._armed:
            self._disarm()

    def _disarm(self) -> None:
        self._pending.clear()
        self._left = [len(b) for b in self.buckets]
        self._seen.clear()
        self._armed = False

    def _start(self, i: int) -> None:
        grads = []
        for p in self.buckets[i]:
            if p.grad is None:       # unused this step: a zero gradient still joins (the other ranks' may not be)
                p.grad = torch.zeros_like(p)
            if p.grad.is_sparse:
                raise RuntimeError(f"gradient buckets reduce dense gradients only; a sparse one came for a "
                                   f"{tuple(p.shape)} parameter (use reducer='horovod')")
            grads.append(p.grad)
        wire = [g.to(torch.float16) for g in grads] if self._compression == "fp16" else grads
        self._pending[i] = (self._launch(wire, f"hvdkit.grads.{i}"), wire)

    def synchronize(self) -> None:
        """Launch what has not gone out (unused parameters, or no :meth:`arm`), wait for every bucket; then each
        ``.grad`` is the average over ranks. Disarmed again: the next step's earlier micro-batches accumulate locally."""
        for i in range(len(self.buckets)):
            if i not in self._pending:
                self._start(i)
        for i, (handle, wire) in sorted(self._pending.items()):
            self._wait(handle)
            if self._compression == "fp16":
                for p, w in zip(self.buckets[i], wire):
                    p.grad.copy_(w)
        self._disarm()

    def remove(self) -> None:
        """Take the hooks off the parameters (the adapter prepared again)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
