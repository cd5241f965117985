"""Train a small ResNet (BatchNorm, residual blocks, dropout, AdamW) on 8x8 digits with PyTorch on N Horovod workers.

    hvdkit launch -np 2 examples/torch_resnet.py --metrics-json results/torch_resnet.json
    hvdkit launch -np 2 examples/torch_resnet.py --sync-batchnorm
    hvdkit launch --launcher mpirun -np 2 examples/torch_resnet.py

Without --sync-batchnorm each rank normalises by its own batch (hvdkit averages the running statistics over
ranks); with it the batch statistics are computed over all ranks' samples of the step.
"""
import torch
from torch import nn

from hvdkit import Trainer
from hvdkit.datasets import digits_split
from hvdkit.scripting import (MetricsFile, config_from_args, main_guard, summary_line, torch_lr_scheduler,
                               limit_train, reducer_flag, training_parser)
from hvdkit.torch import TorchAdapter

# Defaults: in 17 launches of this and keras_resnet.py (seeds 0-4, 1 and 2 workers, with and without
# --sync-batchnorm) test accuracy was >= 0.98 after epoch 10 and >= 0.97 from epoch 9. The LR is scaled
# by the world size and kept constant (--lr-schedule none).
EPOCHS, BATCH_SIZE, LR, WEIGHT_DECAY, CHANNELS = 10, 32, 3e-4, 1e-2, 32


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU (a ResNet basic block, same width and size)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def make_model(channels: int = CHANNELS, dropout: float = 0.2) -> nn.Module:
    # input (N, 1, 8, 8) -> stem -> 2 residual blocks at 8x8 -> global average pool -> dropout -> 10 logits
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        Block(channels), Block(channels),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, 10))


@main_guard
def main():
    parser = training_parser(__doc__.splitlines()[0], epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR)
    reducer_flag(parser)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = digits_split()
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)   # NCHW images
    x_train, y_train = limit_train(args, x_train, y_train)   # --limit-train, checked
    torch.manual_seed(args.seed)
    model = make_model()
    # No weight decay on BatchNorm scales/shifts and biases (the usual ResNet recipe).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    adapter = TorchAdapter(model, optimizer, nn.functional.cross_entropy, compression=args.compression,
                           reducer=args.reducer, scheduler=torch_lr_scheduler(args, optimizer))
    metrics = MetricsFile(args.metrics_json, sync_batchnorm=args.sync_batchnorm, precision=args.precision)
    result = Trainer(adapter, config_from_args(args), [metrics]).fit((x_train, y_train), (x_test, y_test))
    if result.rank == 0:
        print(summary_line(result), flush=True)


if __name__ == "__main__":
    main()
