"""One rank of ``hvdkit bench train`` (run under mpirun): one way of training the same model.

argv: MODE OUT_JSON STEPS BATCH [MODEL]; MODE one of hvdkit-torch, raw-horovod-torch, torch-ddp, torch-nocomm,
hvdkit-keras, raw-horovod-tf, tf-mwms; MODEL ``cnn`` (default: the small CNN) or ``mlp`` (a wide MLP).
Every mode trains on synthetic 28x28 images with batch BATCH per worker, one compute thread per worker, for one warm-up pass of STEPS steps and one timed
pass of STEPS steps; rank 0 writes {"samples_per_sec": ..., "ran_with": ...} for the timed pass, ``ran_with``
read back from the frameworks at the end (``hvdkit.bench.models.ran_with``): their thread counts, the threads that
were busy while training, and the collectives (Horovod's controller and CPU tensor operations, and with
``--probe-ops`` the operations Horovod's timeline shows for one more allreduce; DDP's backend; MWMS's
implementation). The hvdkit modes set nothing themselves: threads, Horovod settings and data pipeline are the kit's.
"""
import json
import os
import sys
import time

from hvdkit.bench.models import TRAIN_MODELS, CpuThreads, horovod_collectives, pin_torch_threads, ran_with
from hvdkit.datasets import synthetic_images

MODE, OUT, STEPS, BATCH = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch_model, keras_model = TRAIN_MODELS[sys.argv[5] if len(sys.argv) > 5 else "cnn"]
RANK = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", 0)))
WORLD = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("HOROVOD_SIZE", 1)))
LR = 0.01


PROBE = "hvdkit.bench.probe"
REDUCER_KEY = "HVDKIT_BENCH_REDUCER"
BUCKET_KEY = "HVDKIT_BENCH_BUCKET_BYTES"


def write(samples_per_sec, ran):
    if RANK == 0:
        with open(OUT, "w") as f:
            json.dump({"mode": MODE, "world_size": WORLD, "samples_per_sec": samples_per_sec, "ran_with": ran}, f)


def torch_horovod_collectives():
    import horovod.torch as hvd
    import torch
    return horovod_collectives(hvd, lambda: hvd.allreduce(torch.zeros(1), name=PROBE), RANK)


def tf_horovod_collectives():
    import horovod.tensorflow as hvd
    import tensorflow as tf
    return horovod_collectives(hvd, lambda: hvd.allreduce(tf.zeros(1), name=PROBE), RANK)


def shard():
    x, y = synthetic_images(STEPS * BATCH * WORLD, seed=0)
    return x[RANK::WORLD], y[RANK::WORLD]


def timed_torch_loop(model, opt, x, y, start_together=None, slowest=None):
    """Samples/s over every rank of a timed pass after a warm-up pass. ``start_together()`` (a barrier) before the
    timed pass and ``slowest(seconds)`` (the longest pass over the ranks) are for ranks that never synchronize
    otherwise (torch-nocomm); a synchronizing job's ranks finish together anyway."""
    import torch
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.functional.cross_entropy

    def one_pass():
        for s in range(STEPS):
            opt.zero_grad()
            loss_fn(model(xs[s * BATCH:(s + 1) * BATCH]), ys[s * BATCH:(s + 1) * BATCH]).backward()
            opt.step()
    one_pass()
    if start_together is not None:
        start_together()
    start = time.perf_counter()
    one_pass()
    elapsed = time.perf_counter() - start
    return STEPS * BATCH * WORLD / (slowest(elapsed) if slowest is not None else elapsed)


def hvdkit_torch():
    import torch
    from hvdkit import TrainConfig, Trainer
    from hvdkit.torch import TorchAdapter
    x, y = synthetic_images(STEPS * BATCH * WORLD, seed=0)
    torch.manual_seed(0)
    model = torch_model()
    # a --variant hvdkit-torch:HVDKIT_BENCH_REDUCER=buckets row measures the other gradient reducer
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), torch.nn.functional.cross_entropy,
                           reducer=os.environ.get(REDUCER_KEY, "horovod"),
                           **({"bucket_bytes": int(os.environ[BUCKET_KEY])} if BUCKET_KEY in os.environ else {}))
    cpu = CpuThreads()
    result = Trainer(adapter, TrainConfig(epochs=2, batch_size=BATCH, progress_bar=False)).fit((x, y))
    collectives = torch_horovod_collectives()
    if WORLD > 1:   # (one worker averages nothing: no reducer)
        collectives.setdefault("knobs", {})[REDUCER_KEY] = torch_reducer(model, adapter.optimizer)
    write(result.history[-1]["samples_per_sec"], ran_with("torch", cpu.busy(), collectives))


def torch_reducer(model, optimizer):
    """Which reducer averaged the gradients, read back from torch: "buckets" when the parameters carry
    post-accumulate-grad hooks (hvdkit.torch.buckets), "horovod" when the optimizer is Horovod's wrapper."""
    if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters()):
        return "buckets"
    return "horovod" if hasattr(optimizer, "synchronize") else "none"


def raw_horovod_torch():
    import horovod.torch as hvd
    import torch
    hvd.init()
    pin_torch_threads(1)
    torch.manual_seed(0)
    model = torch_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR * hvd.size(), momentum=0.9),
                                   named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    cpu = CpuThreads()
    speed = timed_torch_loop(model, opt, *shard())
    write(speed, ran_with("torch", cpu.busy(), torch_horovod_collectives()))


def torch_ddp():
    import torch
    import torch.distributed as dist
    pin_torch_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ.get('HVDKIT_BENCH_PORT', '29534')}",
                            rank=RANK, world_size=WORLD)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR * WORLD, momentum=0.9)
    cpu = CpuThreads()
    speed = timed_torch_loop(model, opt, *shard())
    write(speed, ran_with("torch", cpu.busy(), {"backend": f"torch.distributed {dist.get_backend()}"}))
    dist.destroy_process_group()


def torch_nocomm():
    """Each worker trains its shard alone, nothing averaged: the same compute as every data-parallel row, without
    communication and without waiting for the slower rank, so what no reducer can beat (the ceiling of a ratio to
    DDP). MPI (mpi4py) only lines the ranks' timed passes up and takes the slowest one's time."""
    import torch
    from mpi4py import MPI
    pin_torch_threads(1)
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = torch_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR * WORLD, momentum=0.9)
    cpu = CpuThreads()
    speed = timed_torch_loop(model, opt, *shard(), start_together=comm.Barrier,
                             slowest=lambda seconds: comm.allreduce(seconds, op=MPI.MAX))
    write(speed, ran_with("torch", cpu.busy(), {"backend": f"none (each rank alone; {comm.Get_size()} ranks)"}))


def hvdkit_keras(mode="fit"):
    from hvdkit import TrainConfig, Trainer
    from hvdkit.keras import make_adapter
    import keras
    x, y = synthetic_images(STEPS * BATCH * WORLD, seed=0)
    keras.utils.set_random_seed(0)
    model = keras_model(keras)
    adapter = make_adapter(model, keras.optimizers.SGD(LR, momentum=0.9),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True), mode=mode)
    cpu = CpuThreads()
    result = Trainer(adapter, TrainConfig(epochs=2, batch_size=BATCH, progress_bar=False)).fit((x, y))
    write(result.history[-1]["samples_per_sec"], ran_with("tensorflow", cpu.busy(), tf_horovod_collectives()))


def raw_horovod_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    keras.utils.set_random_seed(0)
    model = keras_model(keras)
    opt = keras.optimizers.SGD(LR * hvd.size(), momentum=0.9)
    opt.build(model.trainable_variables)
    hvd.broadcast_variables([v.value for v in model.variables + opt.variables], root_rank=0)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = hvd.grouped_allreduce(tape.gradient(loss, model.trainable_variables))
        opt.apply(grads, model.trainable_variables)

    x, y = shard()
    batches = [(tf.constant(x[s * BATCH:(s + 1) * BATCH]), tf.constant(y[s * BATCH:(s + 1) * BATCH])) for s in range(STEPS)]
    cpu = CpuThreads()
    for b in batches:
        step(*b)
    start = time.perf_counter()
    for b in batches:
        step(*b)
    speed = STEPS * BATCH * WORLD / (time.perf_counter() - start)
    write(speed, ran_with("tensorflow", cpu.busy(), tf_horovod_collectives()))


def tf_mwms():
    # Keras 3 model.fit fails under MWMS (keras-team/keras#20585); tf_keras works.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    base = int(os.environ.get("HVDKIT_BENCH_PORT", "29535"))
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{base + i}" for i in range(WORLD)]},
                                          "task": {"type": "worker", "index": RANK}})
    import tensorflow as tf
    import tf_keras
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras_model(tf_keras)
        model.compile(optimizer=tf_keras.optimizers.SGD(LR * WORLD, momentum=0.9),
                      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = synthetic_images(STEPS * BATCH * WORLD, seed=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH * WORLD).repeat()
    cpu = CpuThreads()
    model.fit(ds, epochs=1, steps_per_epoch=STEPS, verbose=0)
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=STEPS, verbose=0)
    speed = STEPS * BATCH * WORLD / (time.perf_counter() - start)
    options = getattr(strategy.extended, "_communication_options", None)
    implementation = getattr(getattr(options, "implementation", None), "name", "unknown")
    write(speed, ran_with("tensorflow", cpu.busy(), {"backend": f"tf.distribute collective ops ({implementation})"}))


MODES = {"hvdkit-torch": hvdkit_torch, "hvdkit-torch-horovodrun": hvdkit_torch,   # the launcher differs (run.py)
         "hvdkit-torch-gloo": hvdkit_torch,
         "raw-horovod-torch": raw_horovod_torch, "torch-ddp": torch_ddp,
         "torch-nocomm": torch_nocomm,
         "hvdkit-keras": hvdkit_keras, "hvdkit-keras-loop": lambda: hvdkit_keras("loop"),
         "raw-horovod-tf": raw_horovod_tf, "tf-mwms": tf_mwms}

if __name__ == "__main__":
    MODES[MODE]()
