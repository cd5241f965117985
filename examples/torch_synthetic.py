"""Throughput of a small CNN (2 conv + 2 fc, 28x28 inputs) on synthetic data, PyTorch on N workers.

    hvdkit launch -np 2 examples/torch_synthetic.py --metrics-json results/torch_synthetic.json
"""
import torch
from torch import nn

from hvdkit import Trainer
from hvdkit.bench.models import torch_cnn  # the same CNN `hvdkit bench train` measures
from hvdkit.datasets import synthetic_images
from hvdkit.scripting import (MetricsFile, config_from_args, main_guard, reducer_flag, torch_lr_scheduler,
                               training_parser)
from hvdkit.torch import TorchAdapter


@main_guard
def main():
    parser = training_parser(__doc__.splitlines()[0], epochs=1, batch_size=64, lr=0.01)
    reducer_flag(parser)
    parser.add_argument("--samples", type=int, default=8192, help="synthetic training samples")
    args = parser.parse_args()
    x, y = synthetic_images(args.samples, seed=args.seed)
    x_test, y_test = synthetic_images(1024, seed=args.seed + 1)
    torch.manual_seed(args.seed)
    model = torch_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    adapter = TorchAdapter(model, optimizer, nn.functional.cross_entropy, compression=args.compression,
                           reducer=args.reducer, scheduler=torch_lr_scheduler(args, optimizer))
    metrics = MetricsFile(args.metrics_json, precision=args.precision)
    result = Trainer(adapter, config_from_args(args), [metrics]).fit((x, y), (x_test, y_test))
    if result.rank == 0:
        print(f"{result.samples_per_sec:.0f} samples/s on {result.world_size} workers", flush=True)


if __name__ == "__main__":
    main()
