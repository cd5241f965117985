"""Train a small network on the 8x8 handwritten digits (shipped in hvdkit) with PyTorch on N Horovod workers.

    hvdkit launch -np 2 examples/torch_digits.py --metrics-json results/torch_digits.json
    hvdkit launch --launcher mpirun -np 2 examples/torch_digits.py
"""
import torch
from torch import nn

from hvdkit import Trainer
from hvdkit.datasets import digits_split
from hvdkit.scripting import (MetricsFile, config_from_args, main_guard, summary_line, torch_lr_scheduler,
                               limit_train, optimizer_flag, reducer_flag, torch_optimizer, training_parser)
from hvdkit.torch import TorchAdapter


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def top3_hits(outputs, targets):
    """Per-batch SUM of top-3 hits: reported as eval_top3 (exact over all ranks' test samples)."""
    return (outputs.topk(3, dim=1).indices == targets[:, None]).any(dim=1).sum()


@main_guard
def main():
    parser = training_parser(__doc__.splitlines()[0], epochs=20, batch_size=32, lr=0.05)
    optimizer_flag(parser)
    reducer_flag(parser)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = digits_split()
    x_train, y_train = limit_train(args, x_train, y_train)   # --limit-train, checked
    torch.manual_seed(args.seed)
    model = make_model()
    optimizer = torch_optimizer(args, model.parameters())   # --optimizer: SGD with momentum by default
    adapter = TorchAdapter(model, optimizer, nn.functional.cross_entropy, compression=args.compression,
                           reducer=args.reducer, scheduler=torch_lr_scheduler(args, optimizer), metrics={"top3": top3_hits})
    metrics = MetricsFile(args.metrics_json, precision=args.precision)  # rank 0 writes it at the end of fit
    result = Trainer(adapter, config_from_args(args), [metrics]).fit((x_train, y_train), (x_test, y_test))
    if result.rank == 0:
        print(summary_line(result), flush=True)


if __name__ == "__main__":
    main()
