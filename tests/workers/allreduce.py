"""Worker: allreduce a tensor of one framework and write what each rank got (argv: torch|tensorflow OUT_DIR
[IDLE_SECONDS]). With IDLE_SECONDS, each rank then sits idle that long (Horovod's background thread still
cycling) and also writes the most CPU time any one of its threads used meanwhile, from /proc."""
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
from hvdkit.bench.models import horovod_collectives  # noqa: E402  (the CPU tensor ops Horovod parsed)

record = {"rank": hvd.rank(), "size": hvd.size(), "sum": summed, "average": averaged,
          "mpi": bool(hvd.mpi_enabled()), "gloo": bool(hvd.gloo_enabled()),
          "cpu_ops": horovod_collectives(hvd)["cpu_ops"]}


def thread_cpu_seconds():
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:   # a thread that ended meanwhile
            continue
        seconds[tid] = (int(fields[11]) + int(fields[12])) / ticks   # utime, stime (stat fields 14 and 15)
    return seconds


if idle_seconds:
    hvd.allreduce(value, name="idle.start")   # both ranks start the idle window together
    before, started = thread_cpu_seconds(), time.perf_counter()
    time.sleep(idle_seconds)
    after, record["idle_seconds"] = thread_cpu_seconds(), time.perf_counter() - started
    record["idle_busiest_thread_cpu"] = max(after[tid] - before.get(tid, 0.0) for tid in after)

with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
    json.dump(record, f)
