"""PyTorch model and optimizer behind the trainer; the collectives come from ``hvdkit.torch.process``.

Example::

    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05),
                           torch.nn.functional.cross_entropy, compression="fp16")
    Trainer(adapter, TrainConfig(epochs=2)).fit((x, y))
"""
from __future__ import annotations

import base64
import io
import zlib
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from ..adapter import Adapter
from ..errors import HvdkitError
from .feed import TorchFeed
from .process import HorovodProcess
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

COMPRESSIONS = ("none", "fp16")
OPS = ("average", "adasum")


class TorchAdapter(Adapter):
    """A torch model, its optimizer and a mean-reducing ``loss_fn(outputs, targets)``.

    compression: "none" or "fp16" (gradients cast to fp16 on the wire).
    op: "average" or "adasum" (Horovod's reduction of gradients).
    accuracy: also count argmax-correct predictions in evaluation (classification).
    Batches are ``(inputs, targets)``; the model is called as ``model(inputs)``.
    """

    framework = "torch"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Any, Any], torch.Tensor], compression: str = "none",
                 op: str = "average", accuracy: bool = True):
        if compression not in COMPRESSIONS:
            raise HvdkitError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
        if op not in OPS:
            raise HvdkitError(f"unknown reduction op {op!r}; use one of {', '.join(OPS)}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.compression, self.op, self.accuracy = compression, op, accuracy
        self._base_lrs: List[float] = []

    def default_process(self):
        return HorovodProcess()

    def make_feed(self, data):
        return TorchFeed.of(data)

    # ---- model and optimizer -------------------------------------------------------------
    def prepare(self, lr_factor: float, accumulation: int, sync_batchnorm: bool = False) -> None:
        if sync_batchnorm:
            convert_sync_batchnorm(self.model)
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer = self.process.distributed_optimizer(
            self.optimizer, self.model.named_parameters(), compression=self.compression,
            accumulation=accumulation, op=self.op)
        self.set_lr_factor(lr_factor)

    def broadcast_state(self) -> None:
        self.process.broadcast_parameters(self.model.state_dict())
        # Not hvd.broadcast_optimizer_state: on a fresh optimizer it takes a dummy step, which applies
        # weight decay to the parameters and advances Adam's step count. Rank 0's state dict as an object
        # carries the hyperparameters and any state exactly.
        rank = self.process.rank
        state = self.process.broadcast_object(self.optimizer.state_dict() if rank == 0 else None)
        if rank != 0:
            self.optimizer.load_state_dict(state)

    def set_lr_factor(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def train_step(self, micro_batches) -> Tuple[float, int]:
        self.model.train()
        self.optimizer.zero_grad()
        loss_sum, count = 0.0, 0
        for batch in micro_batches:
            if batch.count:
                loss = self.loss_fn(self.model(batch.inputs), batch.targets)
                (loss * batch.weight).backward()
                loss_sum += float(loss.detach()) * batch.count
                count += batch.count
            else:
                self._zero_gradient(batch.inputs)
        self.optimizer.step()
        return loss_sum, count

    def _zero_gradient(self, empty_inputs) -> None:
        """No samples here in this (last, short) step: a zero gradient still joins the allreduce. The model runs
        on the empty batch, so SyncBatchNorm's collective runs on every rank and sparse gradients stay sparse
        (an Embedding(sparse=True)'s zeros must meet the others' sparse tensors in the same collective)."""
        needs_forward = any(isinstance(m, SyncBatchNorm) for m in self.model.modules())
        if empty_inputs is not None:
            try:
                outputs = self.model(empty_inputs)
            except Exception as e:  # some layers refuse zero rows; only SyncBatchNorm needs the forward pass
                if needs_forward:
                    raise HvdkitError(f"the model cannot run on an empty batch ({type(e).__name__}: {e}), which "
                                      "SyncBatchNorm needs on a rank without samples in the last step; choose a "
                                      "batch size or worker count that leaves every rank a sample") from None
                outputs = None
            leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if torch.is_tensor(t)]
            if leaves:
                (sum(t.sum() for t in leaves) * 0).backward()
                return
        sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad).backward()

    def min_batch_samples(self) -> int:
        # torch's BatchNorm raises on a 1-sample batch in training mode; SyncBatchNorm counts every rank's
        # samples, except at one rank, where it is plain BatchNorm
        alone = self.process is None or self.process.size == 1
        plain_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (alone or not isinstance(m, SyncBatchNorm))
                       for m in self.model.modules())
        return 2 if plain_bn else 1

    def sync_buffers(self) -> None:
        self.process.average_tensors([b for b in self.model.buffers() if b.is_floating_point()])

    def rng_state(self) -> str:
        return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()

    def set_rng_state(self, state: str) -> None:
        torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()))

    def seed_rank(self, seed: int) -> None:
        torch.manual_seed(seed)

    def metric_names(self) -> List[str]:
        return ["loss", "count"] + (["correct"] if self.accuracy else [])

    @torch.no_grad()
    def eval_batch(self, inputs, targets) -> Dict[str, float]:
        self.model.eval()
        outputs = self.model(inputs)
        sums = {"loss": float(self.loss_fn(outputs, targets)) * len(targets), "count": float(len(targets))}
        if self.accuracy:
            sums["correct"] = float((outputs.argmax(dim=1) == targets).sum())
        return sums

    def parameter_checksums(self, buffers: bool = True) -> List[Tuple[str, int]]:
        tensors = list(self.model.named_parameters()) + (list(self.model.named_buffers()) if buffers else [])
        return [(name, zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes())) for name, t in tensors]

    # ---- state -------------------------------------------------------------------------------
    def state_to_bytes(self, progress: Dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "progress": dict(progress), "torch_rng": torch.get_rng_state()}, buffer)
        return buffer.getvalue()

    def state_from_bytes(self, blob: bytes) -> Dict[str, Any]:
        try:
            saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            return dict(saved["progress"])
        except Exception as e:  # a file from outside: any failure to read it is the file's, reported in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise HvdkitError(f"does not fit this model or optimizer ({type(e).__name__}: {first[:200]})") from None
