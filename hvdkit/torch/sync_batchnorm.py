"""BatchNorm whose training statistics span every rank's samples, on Horovod's differentiable allreduce.

Horovod's own ``hvd.SyncBatchNorm`` accepts GPU tensors only ("SyncBatchNorm expected input tensor to be on
GPU"), so this one works on CPU: per channel, each rank's sum, sum of squares and count (float64) are summed
over ranks in one allreduce, whose gradient is again an allreduce, so backward is exact too. A rank with no
samples in a step still calls it (on an empty batch) and adds zeros. Without Horovod running (or at one rank)
it is plain BatchNorm.

Example::

    model = convert_sync_batchnorm(model)      # every BatchNorm*d replaced, parameters and buffers shared
"""
from __future__ import annotations

import torch
from torch import nn


def _horovod():
    """horovod.torch when it runs with more than one rank, else None."""
    try:
        import horovod.torch as hvd
        return hvd if hvd.is_initialized() and hvd.size() > 1 else None
    except (ImportError, ValueError):
        return None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``nn.BatchNorm1d/2d/3d`` (any input with channels in dim 1)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        hvd = _horovod()
        if not self.training or hvd is None:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        x64 = x.double()
        local = torch.cat([x64.sum(dims), (x64 * x64).sum(dims),
                           torch.tensor([x.numel() // max(channels, 1)], dtype=torch.float64)])
        total = hvd.allreduce(local, op=hvd.Sum, name="hvdkit.sync_batchnorm")
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
    """``module`` with every BatchNorm layer replaced by :class:`SyncBatchNorm`, sharing the same parameter and
    buffer objects (so an optimizer built on the old parameters keeps working)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        for name, value in list(module._parameters.items()):
            new._parameters[name] = value
        for name, value in list(module._buffers.items()):
            new._buffers[name] = value
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]
