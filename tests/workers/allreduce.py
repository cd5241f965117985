"""Worker: allreduce a tensor of one framework and write what each rank got (argv: torch|tensorflow OUT_DIR
[IDLE_SECONDS]). With IDLE_SECONDS, each rank then sits idle twice that long (Horovod's background thread still
cycling) and also writes, per window, the most CPU time any one of its threads used meanwhile, from /proc."""
import json
import os
import sys
import time

from hvdkit.process import apply_stall_defaults
from hvdkit.tuning import apply_defaults

framework, out_dir = sys.argv[1], sys.argv[2]
idle_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
# What the kit's processes set before hvd.init() (cycle time, MPI yielding, stall check). This is the first
# hvd.init() of its shared launch and Horovod reads them only there, so the later runs get them too, as each
# would in a launch of its own.
apply_defaults()
apply_stall_defaults()
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
from hvdkit.bench.models import _thread_cpu, horovod_collectives  # noqa: E402  (CPU per thread; the tensor ops)

record = {"rank": hvd.rank(), "size": hvd.size(), "sum": summed, "average": averaged,
          "mpi": bool(hvd.mpi_enabled()), "gloo": bool(hvd.gloo_enabled()),
          "cpu_ops": horovod_collectives(hvd)["cpu_ops"]}

if idle_seconds:
    # Two windows back to back: a busy wait holds its core in both; a burst of other load most likely touches one
    hvd.allreduce(value, name="idle.start")   # both ranks start the first idle window together
    record["idle_windows"] = []
    for _ in range(2):
        before, started = _thread_cpu(), time.perf_counter()   # tid -> (name, CPU seconds), from /proc
        time.sleep(idle_seconds)
        after, seconds = _thread_cpu(), time.perf_counter() - started
        # each thread as (CPU seconds, name, its tid - the pid: 0 is the main thread; others mostly in order of
        # creation, negative once thread ids wrapped around)
        used = sorted(((cpu - before.get(tid, (name, 0.0))[1], name, int(tid) - os.getpid())
                       for tid, (name, cpu) in after.items()), reverse=True)
        record["idle_windows"].append({"seconds": seconds, "busiest": used[:2]})

with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
    json.dump(record, f)
