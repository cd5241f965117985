"""Worker for tests/test_stall.py: a tiny torch job in which rank 1 stops calling collectives for a while.

argv: OUT_DIR SLEEP_SECONDS. Rank 1 sleeps SLEEP_SECONDS in ``on_step_end`` of step 3 (outside any collective)
while rank 0 goes on into step 4's gradient allreduce and waits there. Each rank writes OUT_DIR/rank{r}.json
with the stall variables Horovod saw and how the run ended, then exits 0 (trained) or 1 (an error).
"""
import json
import os
import sys
import time

import torch

from hvdkit import TrainConfig, Trainer
from hvdkit.callbacks import Callback
from hvdkit.torch import TorchAdapter

out_dir, sleep = sys.argv[1], float(sys.argv[2])
STALL_VARS = ("HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")


class SleepOnRank1(Callback):
    all_ranks = True

    def on_step_end(self, trainer, global_step, loss):
        if global_step == 3 and trainer.process.rank == 1:
            time.sleep(sleep)


torch.manual_seed(0)
x = torch.randn(64, 4)
y = (x.sum(1) > 0).long()
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
trainer = Trainer(adapter, TrainConfig(epochs=1, batch_size=4, progress_bar=False, check_divergence=False),
                  callbacks=[SleepOnRank1()])
started = time.monotonic()
record = {}
try:
    trainer.fit((x.numpy(), y.numpy()))
    record["outcome"] = "trained"
except Exception as e:  # the report the test reads; the traceback goes to stderr as usual
    record["outcome"] = f"{type(e).__name__}: {e}"
    raise
finally:
    rank = trainer.process.rank if trainer.process is not None and trainer.process.hvd is not None else -1
    record.update({k: os.environ.get(k) for k in STALL_VARS}, seconds=time.monotonic() - started)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
