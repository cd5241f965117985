"""PyTorch on Horovod: ``horovod.torch`` does the collectives, this wires them correctly.

Example::

    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05),
                           torch.nn.functional.cross_entropy, compression="fp16")
    Trainer(adapter, TrainConfig(epochs=2)).fit((x, y))
"""
from __future__ import annotations

import io
import zlib
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from ..adapter import Adapter, HorovodProcess
from ..errors import HvdkitError
from ..sharding import Step
from ..tuning import apply_defaults
from .data import TorchData

COMPRESSIONS = ("none", "fp16")
OPS = ("average", "adasum")


class TorchAdapter(HorovodProcess, Adapter):
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
        self.hvd = None
        self._base_lrs: List[float] = []

    # ---- process and collectives ---------------------------------------------------------
    def init(self, seed: int, threads: int) -> None:
        import horovod.torch as hvd
        apply_defaults()  # hvdkit's measured Horovod settings, unless the user set them
        hvd.init()
        self.hvd = hvd
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # only settable before the first parallel op; keep what the user chose
            pass
        torch.manual_seed(seed)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.asarray(values, dtype=np.float64).copy())
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name="hvdkit.metrics").numpy()

    # ---- model and optimizer -------------------------------------------------------------
    def prepare(self, lr_factor: float, accumulation: int) -> None:
        hvd = self.hvd
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer = hvd.DistributedOptimizer(
            self.optimizer, named_parameters=self.model.named_parameters(),
            compression=hvd.Compression.fp16 if self.compression == "fp16" else hvd.Compression.none,
            backward_passes_per_step=accumulation,
            op=hvd.Adasum if self.op == "adasum" else hvd.Average)
        self.set_lr_factor(lr_factor)

    def broadcast_state(self) -> None:
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        # Not hvd.broadcast_optimizer_state: on a fresh optimizer it takes a dummy step, which applies
        # weight decay to the parameters and advances Adam's step count. Rank 0's state dict as an object
        # carries the hyperparameters and any state exactly.
        state = self.broadcast_object(self.optimizer.state_dict() if self.rank == 0 else None)
        if self.rank != 0:
            self.optimizer.load_state_dict(state)

    def elastic_run(self, fn):
        import horovod.torch.elastic
        return horovod.torch.elastic.run(fn)

    def set_lr_factor(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def _source(self, data) -> TorchData:
        return self._cached(data, TorchData.of)

    def dataset_len(self, data) -> int:
        return len(self._source(data))

    def train_step(self, data, step: Step) -> Tuple[float, int]:
        source = self._source(data)
        self.model.train()
        self.optimizer.zero_grad()
        loss_sum, count = 0.0, 0
        for ids, weight in zip(step.micro_batches, step.weights):
            if len(ids):
                inputs, targets = source.batch(ids)
                loss = self.loss_fn(self.model(inputs), targets)
                (loss * weight).backward()
                loss_sum += float(loss.detach()) * len(ids)
                count += len(ids)
            else:
                # No samples here in this (last, short) step: a zero gradient still joins the allreduce.
                sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad).backward()
        self.optimizer.step()
        return loss_sum, count

    @torch.no_grad()
    def eval_batch(self, data, ids: np.ndarray) -> Dict[str, float]:
        sums = {"loss": 0.0, "count": float(len(ids))}
        if self.accuracy:
            sums["correct"] = 0.0
        if len(ids):
            self.model.eval()
            inputs, targets = self._source(data).batch(ids)
            outputs = self.model(inputs)
            sums["loss"] = float(self.loss_fn(outputs, targets)) * len(ids)
            if self.accuracy:
                sums["correct"] = float((outputs.argmax(dim=1) == targets).sum())
        return sums

    def parameter_checksums(self) -> List[Tuple[str, int]]:
        return [(name, zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes()))
                for name, t in self.model.state_dict().items()]

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
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HvdkitError(f"checkpoint does not fit this model or optimizer ({first}); "
                              "use another --checkpoint-dir") from None
        torch.set_rng_state(saved["torch_rng"])
        return dict(saved["progress"])
