"""What every training and allreduce benchmark worker shares: the one small CNN (2 conv + 2 fc, 28x28x1), and the
read-back of what the worker's process really ran with (threads, busy threads, collectives), reported per row.

Example::

    model = torch_cnn()                 # or keras_cnn(keras)
    cpu = CpuThreads()                  # before the measured part
    ...                                 # training
    info = ran_with("torch", cpu.busy(), horovod_collectives(hvd, lambda: hvd.allreduce(torch.zeros(1), name="p")))
"""
import os
import re
import tempfile
import time


def torch_cnn():
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x):
            return self.head(self.features(x.permute(0, 3, 1, 2)))  # data is NHWC, as for Keras

    return SmallCNN()


def torch_mlp(width: int = 2048, depth: int = 1):
    """Flatten, 784 -> ``width``, ``depth`` x ``width`` -> ``width``, -> 10, ReLU between: few large gradients
    (the default: 5.8M parameters, 23 MB of float32 gradients), where the CNN has many small ones."""
    from torch import nn
    layers = [nn.Flatten(), nn.Linear(28 * 28, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def keras_mlp(keras, width: int = 2048, depth: int = 1):
    """:func:`torch_mlp` in Keras."""
    layers = keras.layers
    return keras.Sequential([keras.Input(shape=(28, 28, 1)), layers.Flatten(),
                             *[layers.Dense(width, activation="relu") for _ in range(depth + 1)], layers.Dense(10)])


def keras_cnn(keras):
    layers = keras.layers
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(10)])


#: bench train's models by name: (torch builder, Keras builder taking the keras module)
TRAIN_MODELS = {"cnn": (torch_cnn, keras_cnn), "mlp": (torch_mlp, keras_mlp)}


# ---- what the process ran with, read back (not assumed from the row's settings) ------------------------------
#: a thread counts as busy when it used at least this share of the process's CPU time over the measured part
#: (a share of the process, not of a core: on a loaded host every thread gets less of a core)
BUSY_SHARE = 0.1


def pin_torch_threads(threads: int = 1) -> None:
    """The baselines' threads, as the kit's torch process sets them: ``threads`` intra-op and inter-op threads
    (inter-op only settable before torch's first parallel op; read back either way)."""
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass


def _thread_cpu() -> dict:
    """tid -> (name, CPU seconds so far) of every thread of this process (Linux /proc; empty elsewhere)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)   # utime + stime
        except (OSError, IndexError, ValueError):
            continue   # the thread ended meanwhile
    return out


class CpuThreads:
    """CPU time per thread of this process from construction to :meth:`busy`: which threads really computed."""

    def __init__(self):
        self.start, self.wall = _thread_cpu(), time.perf_counter()

    def busy(self) -> dict:
        """``{"busy_threads": n, "busy_shares": [their shares of the process's CPU time, largest first],
        "busy_names": [their names: "main" for the main thread, else the OS thread name, e.g. TF's "tf_Compute"],
        "cpu_cores_used": process CPU seconds / wall seconds}`` over the measured part."""
        end, wall = _thread_cpu(), max(time.perf_counter() - self.wall, 1e-9)
        main = str(os.getpid())
        used = sorted((("main" if tid == main else name, cpu - self.start.get(tid, (name, 0.0))[1])
                       for tid, (name, cpu) in end.items()), key=lambda item: -item[1])
        total = sum(u for _, u in used)
        busy = [(name, round(u / total, 2)) for name, u in used if total and u / total >= BUSY_SHARE]
        return {"busy_threads": len(busy), "busy_shares": [share for _, share in busy],
                "busy_names": [name for name, _ in busy], "cpu_cores_used": round(total / wall, 2)}


def framework_threads(framework: str) -> dict:
    """The compute thread counts the framework reports it runs with: torch's intra-/inter-op threads, or TF's
    intra-/inter-op pool sizes (0 there means TF's default: every core)."""
    if framework == "torch":
        import torch
        return {"framework": "torch", "intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}
    import tensorflow as tf
    return {"framework": "tensorflow", "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


def _c_getenv(name: str):
    """``name`` in this process's C environment (what Horovod's ``getenv`` reads), None if unset."""
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        value = libc.getenv(name.encode())
    except (OSError, AttributeError):
        return os.environ.get(name)
    return value.decode() if value is not None else None


#: Horovod's tuning knobs as its C++ side reads them, reported by every Horovod row (bench train --variant checks them)
HOROVOD_KNOBS = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CACHE_CAPACITY",
                 "OMPI_MCA_mpi_yield_when_idle")


def horovod_collectives(hvd, reduce_once=None, rank: int = 0) -> dict:
    """Horovod's controller, as Horovod reports it (``hvd.mpi_enabled()`` / ``gloo_enabled()``), and the CPU tensor
    operations this process runs: what Horovod's parser (``ParseCPUOpsFromEnv`` in horovod/common/utils/
    env_parser.cc, read at ``hvd.init()``) makes of the ``HOROVOD_CPU_OPERATIONS`` in this process's C environment —
    MPI when it is unset (oneCCL when built with it), a launcher may have set it (horovodrun --gloo sets ``gloo``).

    With ``HOROVOD_TIMELINE=DYNAMIC`` in the row's environment (``hvdkit bench ... --probe-ops``) one more
    allreduce (``reduce_once``, run by every rank) is recorded in Horovod's timeline after the measurement, and the
    activity it shows (MPI_ALLREDUCE, GLOO_ALLREDUCE, ...) is reported as ``cpu_ops_timeline``: proof from the
    library itself. Not for measuring: an initialized timeline keeps a writer thread spinning on rank 0 (about half a
    core here) for the whole run."""
    given = _c_getenv("HOROVOD_CPU_OPERATIONS")
    if given:
        ops, source = given.strip().lower(), f"HOROVOD_CPU_OPERATIONS={given}"
    else:
        ops, source = ("ccl" if hvd.ccl_built() else "mpi"), "Horovod's default (HOROVOD_CPU_OPERATIONS unset)"
    out = {"controller": "mpi" if hvd.mpi_enabled() else "gloo" if hvd.gloo_enabled() else "unknown",
           "cpu_ops": ops, "cpu_ops_from": source, "knobs": {k: _c_getenv(k) for k in HOROVOD_KNOBS}}
    if reduce_once is None or _c_getenv("HOROVOD_TIMELINE") != "DYNAMIC":
        return out
    out["cpu_ops_timeline"] = "not seen"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        hvd.start_timeline(path, mark_cycles=False)
        reduce_once()
        hvd.stop_timeline()
        if rank == 0:   # only rank 0 writes; its writer thread flushes after the op: wait for the activity
            deadline = time.time() + 10
            while time.time() < deadline:
                found = re.findall(r'"name": "(MPI|GLOO|CCL|NCCL)_(?:ADASUM_)?ALLREDUCE"', _read(path))
                if found:
                    out["cpu_ops_timeline"] = found[0].lower()
                    break
                time.sleep(0.05)
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpus_allowed():
    """The CPUs this process may run on (a launcher's binding as the kernel applies it), sorted; None off Linux."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def ran_with(framework: str = None, busy: dict = None, collectives: dict = None) -> dict:
    """One row's read-back: the framework's thread counts (``torch`` or ``tensorflow``; None: neither ran),
    ``busy`` (:meth:`CpuThreads.busy`, taken before any probe), the collectives, and the CPUs this process may run
    on (``cpus_allowed``: the launcher's binding as the kernel applies it)."""
    return {"threads": framework_threads(framework) if framework else None,
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "collectives": collectives or {},
            "cpus_allowed": cpus_allowed(), **(busy or {})}
