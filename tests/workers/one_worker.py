"""One static worker under Horovod (size 1): a BatchNorm model trained for one epoch, plain and with the sharded
optimizer, inside a dynamic Horovod timeline (HOROVOD_TIMELINE=DYNAMIC), so the test can read back which
collectives Horovod really ran.

Usage: python one_worker.py torch|keras TIMELINE.json RESULT.json
"""
import json
import sys

import numpy as np


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)


def main(framework: str, timeline: str, out: str) -> None:
    from hvdkit import TrainConfig, Trainer
    record = {}
    if framework == "torch":
        import horovod.torch as hvd
        import torch
        from hvdkit.torch import TorchAdapter
        from hvdkit.torch.process import HorovodProcess

        def adapter():
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                      torch.nn.Linear(16, 3))
            return TorchAdapter(net, torch.optim.Adam(net.parameters(), lr=0.01), torch.nn.functional.cross_entropy)
    else:
        import horovod.tensorflow as hvd
        import keras
        from hvdkit.keras import make_adapter
        from hvdkit.keras.process import HorovodProcess

        def adapter():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                                      keras.layers.ReLU(), keras.layers.Dense(3)])
            return make_adapter(model, keras.optimizers.Adam(0.01),
                                keras.losses.SparseCategoricalCrossentropy(from_logits=True), mode="loop")
    process = HorovodProcess()
    process.init(seed=0, threads=1)
    hvd.start_timeline(timeline)
    for shard in (False, True):
        a = adapter()
        result = Trainer(a, TrainConfig(epochs=1, batch_size=8, elastic=False, shard_optimizer=shard,
                                        clip_grad_norm=1.0), process=process).fit(data())
        record[f"shard={shard}"] = {"steps": result.global_step, "size": process.size,
                                    "optimizer": type(a.optimizer).__module__ + "." + type(a.optimizer).__name__}
    hvd.stop_timeline()
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
