"""BatchNorm whose training statistics span every rank's samples, on Horovod's allreduce.

Horovod's own ``hvd.SyncBatchNorm`` accepts GPU tensors only ("SyncBatchNorm expected input tensor to be on
GPU"), so this one works on CPU: per channel, each rank's sum, sum of squares and count (float64) are summed
over ranks in one allreduce, and backward sums the gradients of those totals the same way, so backward is
exact too. Both collectives carry the layer's position in the model as their name (Horovod pairs collectives
by name; its auto-names come from per-process counters, which differ on a worker that joined later). A rank
with no samples in a step still calls it (on an empty batch) and adds zeros. Without Horovod running it is
plain BatchNorm.

Example::

    model = convert_sync_batchnorm(model)      # every BatchNorm*d replaced, parameters and buffers shared
"""
from __future__ import annotations

import torch
from torch import nn


def _horovod():
    """horovod.torch when it has been initialised (any world size), else None."""
    try:
        import horovod.torch as hvd
        return hvd if hvd.is_initialized() else None
    except (ImportError, ValueError):
        return None


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the gradients, both under fixed names."""

    @staticmethod
    def forward(ctx, tensor, name):
        hvd = _horovod()
        ctx.name = name
        return hvd.synchronize(hvd.allreduce_async(tensor.clone(), op=hvd.Sum, name=f"{name}.forward"))

    @staticmethod
    def backward(ctx, grad):
        hvd = _horovod()
        return hvd.synchronize(hvd.allreduce_async(grad.contiguous(), op=hvd.Sum, name=f"{ctx.name}.backward")), None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``nn.BatchNorm1d/2d/3d`` (any input with channels in dim 1). ``name``: the collectives'
    name, the same on every rank (:func:`convert_sync_batchnorm` numbers the layers in model order)."""

    def __init__(self, *args, name: str = "hvdkit.sync_bn", **kwargs):
        super().__init__(*args, **kwargs)
        self.collective_name = name

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or _horovod() is None:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        x64 = x.double()
        local = torch.cat([x64.sum(dims), (x64 * x64).sum(dims),
                           torch.tensor([x.numel() // max(channels, 1)], dtype=torch.float64)])
        total = _SumOverRanks.apply(local, self.collective_name)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        out = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by :class:`SyncBatchNorm` (named by its position in the
    model), sharing the same parameter and buffer objects (an optimizer built on them keeps working)."""
    counter = [0]

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm):
            new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                name=f"hvdkit.sync_bn.{counter[0]}")
            counter[0] += 1
            new._parameters.update(m._parameters)
            new._buffers.update(m._buffers)
            new.train(m.training)
            return new
        for name, child in m.named_children():
            converted = convert(child)
            if converted is not child:
                setattr(m, name, converted)
        return m
    return convert(module)
