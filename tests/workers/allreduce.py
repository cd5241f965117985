"""Worker: allreduce a tensor of one framework and write what each rank got (argv: torch|tensorflow OUT_DIR)."""
import json
import os
import sys

framework, out_dir = sys.argv[1], sys.argv[2]
if framework == "torch":
    import horovod.torch as hvd
    import torch
    hvd.init()
    value = torch.arange(4, dtype=torch.float32) * (hvd.rank() + 1)
    summed = hvd.allreduce(value, op=hvd.Sum).tolist()
    averaged = hvd.allreduce(value, op=hvd.Average).tolist()
else:
    import horovod.tensorflow as hvd
    import tensorflow as tf
    hvd.init()
    value = tf.range(4, dtype=tf.float32) * float(hvd.rank() + 1)
    summed = hvd.allreduce(value, op=hvd.Sum).numpy().tolist()
    averaged = hvd.allreduce(value, op=hvd.Average).numpy().tolist()
from hvdkit.bench.models import horovod_collectives  # noqa: E402  (the CPU tensor ops Horovod parsed)

record = {"rank": hvd.rank(), "size": hvd.size(), "sum": summed, "average": averaged,
          "mpi": bool(hvd.mpi_enabled()), "gloo": bool(hvd.gloo_enabled()),
          "cpu_ops": horovod_collectives(hvd)["cpu_ops"]}
with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
    json.dump(record, f)
