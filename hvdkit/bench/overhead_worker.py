"""``hvdkit bench overhead``'s worker: what the kit adds to a step at one worker, rows taking turns in one process.

At one worker a static job steps without Horovod (averaging over one rank is the identity: the same step path as a
plain process, :meth:`hvdkit.process.HorovodProcess.per_step_identity`), so the kit's own cost is a one-process
question. Between separate processes this 2-core machine swings by up to 30%; here every row trains the same model
from the same initial weights on the same samples and batch size (the kit's rows in the trainer's shuffled order,
gathered by index; the plain rows in order), in this one process, round after round with the order rotated, so a
swing hits every row of a round alike and the per-round ratios keep only the difference.

Rows, torch: ``hvdkit`` (TorchAdapter under the Trainer, its defaults), ``hvdkit-guard-off`` (the same with
``nonfinite="off"``: no norm of the gradients per step) and ``plain`` (a hand-written loop). Keras: ``hvdkit-loop``
(KerasAdapter), ``hvdkit-fit`` (KerasFitAdapter, Keras' ``model.fit``), ``plain-loop`` (a ``tf.function``
GradientTape step) and ``plain-fit`` (the compiled model's own ``model.fit``, no kit). A kit row's figure is the
second epoch of a 2-epoch ``Trainer.fit`` (the trainer's samples/s, timed over the epoch's steps and its loss
allreduce, the identity here; the end-of-epoch checks and the commit fall outside it); a
plain row's a timed pass after a warm-up pass, as in ``bench train``. Each row's trained samples per turn and the
threads its framework reports after each turn are recorded.

argv: FRAMEWORK (torch|keras) MODEL (cnn|mlp) OUT_JSON STEPS BATCH ROUNDS
"""
import json
import sys
import time

from hvdkit import TrainConfig, Trainer
from hvdkit.bench.models import TRAIN_MODELS, CpuThreads, framework_threads, ran_with
from hvdkit.datasets import synthetic_images

LR = 0.01
ROWS = {"torch": ["hvdkit", "hvdkit-guard-off", "plain"],
        "keras": ["hvdkit-loop", "hvdkit-fit", "plain-loop", "plain-fit"]}


def kit_row(adapter, x, y, batch, nonfinite="stop"):
    """(samples/s, samples) of the second epoch of a 2-epoch ``Trainer.fit``."""
    def once():
        result = Trainer(adapter, TrainConfig(epochs=2, batch_size=batch, progress_bar=False,
                                              nonfinite=nonfinite)).fit((x, y))
        return result.history[-1]["samples_per_sec"], result.history[-1]["train_samples"]
    return once


def timed_passes(one_pass, samples):
    """(samples/s, samples) of a timed pass after a warm-up pass."""
    def once():
        one_pass()
        start = time.perf_counter()
        one_pass()
        return samples / (time.perf_counter() - start), samples
    return once


def torch_rows(model_name, x, y, steps, batch):
    import torch
    from hvdkit.torch import TorchAdapter
    build = TRAIN_MODELS[model_name][0]

    def adapter():
        torch.manual_seed(0)
        model = build()
        return TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
                            torch.nn.functional.cross_entropy)

    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)

    def one_pass():
        for s in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[s * batch:(s + 1) * batch]),
                                              ys[s * batch:(s + 1) * batch]).backward()
            opt.step()
    return {"hvdkit": kit_row(adapter(), x, y, batch), "hvdkit-guard-off": kit_row(adapter(), x, y, batch, "off"),
            "plain": timed_passes(one_pass, steps * batch)}


def keras_rows(model_name, x, y, steps, batch):
    import keras
    import tensorflow as tf
    from hvdkit.keras import make_adapter
    from hvdkit.keras.data import one_thread_options
    build = TRAIN_MODELS[model_name][1]

    def loss():
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def model():
        keras.utils.set_random_seed(0)
        return build(keras)

    rows = {mode: kit_row(make_adapter(model(), keras.optimizers.SGD(LR, momentum=0.9), loss(), mode=mode.split("-")[1]),
                          x, y, batch) for mode in ("hvdkit-loop", "hvdkit-fit")}
    plain, loss_fn = model(), loss()
    opt = keras.optimizers.SGD(LR, momentum=0.9)
    opt.build(plain.trainable_variables)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss_fn(yb, plain(xb, training=True))
        opt.apply(tape.gradient(value, plain.trainable_variables), plain.trainable_variables)

    batches = [(tf.constant(x[s * batch:(s + 1) * batch]), tf.constant(y[s * batch:(s + 1) * batch]))
               for s in range(steps)]

    def one_pass():
        for b in batches:
            step(*b)
    rows["plain-loop"] = timed_passes(one_pass, steps * batch)
    compiled = model()
    # jit_compile off as the kit's fit adapter has it (Horovod's ops have no XLA kernels)
    compiled.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9), loss=loss(), jit_compile=False)
    # the input on one private thread, as the kit's fit input runs (hvdkit.keras.data.one_thread_options)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).with_options(one_thread_options())
    rows["plain-fit"] = timed_passes(lambda: compiled.fit(dataset, epochs=1, verbose=0, shuffle=False), steps * batch)
    return rows


def main(argv):
    framework, model_name, out, steps, batch, rounds = argv[0], argv[1], argv[2], *map(int, argv[3:6])
    x, y = synthetic_images(steps * batch, seed=0)
    rows = (torch_rows if framework == "torch" else keras_rows)(model_name, x, y, steps, batch)
    assert list(rows) == ROWS[framework]
    tf_or_torch = "torch" if framework == "torch" else "tensorflow"
    cpu = CpuThreads()
    found = {name: [] for name in rows}
    samples = {name: [] for name in rows}
    threads = {name: [] for name in rows}   # read back after each row's turn: the rows share the process
    names = list(rows)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:   # the order rotated each round
            speed, trained = rows[name]()
            found[name].append(speed)
            samples[name].append(trained)
            threads[name].append(framework_threads(tf_or_torch))
    with open(out, "w") as f:
        json.dump({"framework": framework, "model": model_name, "steps": steps, "batch": batch, "rounds": rounds,
                   "rows": found, "samples": samples, "threads": threads,
                   "ran_with": ran_with(tf_or_torch, cpu.busy())}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
