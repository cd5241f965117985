"""Worker for tests/test_tfdata_parallel.py: tf.data sources sharded by rank, in one launch.

argv: OUT_DIR. Each rank writes OUT_DIR/rank{r}.json with what it observed; the test asserts.
"""
import json
import os
import sys

import numpy as np

from hvdkit import TrainConfig, Trainer
from hvdkit.keras import KerasAdapter, KerasFitAdapter, TFFiles, TFStream
import keras
import tensorflow as tf

out_dir = sys.argv[1]
rank_env = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
rng = np.random.default_rng(3)
N, COUNTS = 50, [7, 12, 9, 15, 7]          # 5 files of uneven size: ranks hold 23 and 27 examples
X = rng.normal(size=(N, 6)).astype(np.float32)
X[:, 0] = np.arange(N)                     # column 0 carries the example id (read back below)
Y = rng.integers(0, 3, size=N).astype(np.int64)
X_EVAL, Y_EVAL = rng.normal(size=(37, 6)).astype(np.float32), rng.integers(0, 3, size=37).astype(np.int64)


def write_files(directory):
    os.makedirs(directory, exist_ok=True)
    paths, start = [], 0
    for i, count in enumerate(COUNTS):
        path = os.path.join(directory, f"part-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for j in range(start, start + count):
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=X[j])),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[Y[j]]))}))
                w.write(ex.SerializeToString())
        paths.append(path)
        start += count
    return paths


def parse(record):
    f = tf.io.parse_single_example(record, {"x": tf.io.FixedLenFeature([6], tf.float32),
                                            "y": tf.io.FixedLenFeature([], tf.int64)})
    return f["x"], f["y"]


FILES = write_files(os.path.join(out_dir, f"files{rank_env}"))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def model_and_opt(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    return model, keras.optimizers.SGD(0.05)


def flat(model):
    return np.concatenate([v.numpy().ravel() for v in model.variables]).astype(np.float64)


def reference(source, world, epochs, batch, seed=0):
    """One process: step s trains on the union of every rank's s-th batch of its shuffled shard."""
    model, opt = model_and_opt(123)
    keras.utils.set_random_seed(seed)  # as the adapter does: shuffles depend on TF's global seed too
    for epoch in range(epochs):
        per_rank = [list(source.rank_dataset(r, world, seed, epoch).batch(batch)) for r in range(world)]
        for s in range(max(len(b) for b in per_rank)):
            parts = [b[s] for b in per_rank if s < len(b)]
            total = sum(len(p[1]) for p in parts)
            with tf.GradientTape() as tape:
                loss = sum(LOSS(y, model(x, training=True)) * (len(y) / total) for x, y in parts)
            opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return model


record = {}
cfg = dict(epochs=2, batch_size=4, lr_scaling="none", progress_bar=False, seed=0)
sources = {"files": TFFiles(FILES, parse=parse), "stream": TFStream(tf.data.Dataset.from_tensor_slices((X, Y)), n=N)}
for source_name, source in sources.items():
    for mode in ("fit", "loop"):
        model, opt = model_and_opt(123 + 1000 * rank_env)
        if mode == "fit":
            model.compile(optimizer=opt, loss=LOSS)
            adapter = KerasFitAdapter(model)
        else:
            adapter = KerasAdapter(model, opt, LOSS)
        eval_source = TFStream(tf.data.Dataset.from_tensor_slices((X_EVAL, Y_EVAL)), n=37)
        result = Trainer(adapter, TrainConfig(**cfg)).fit(source, eval_source)
        world = result.world_size
        ref = reference(source, world, 2, 4)
        key = f"{source_name}_{mode}"
        record[key] = {"maxdiff": float(np.abs(flat(model) - flat(ref)).max()), "steps": result.global_step,
                       "samples": result.train_samples_per_epoch, "eval_samples": result.eval["samples"],
                       "eval_accuracy": result.eval["accuracy"],
                       "expected_accuracy": float((model(X_EVAL).numpy().argmax(1) == Y_EVAL).mean())}
        if mode == "loop":  # the collectives in the loop's step graphs, by name (tracing runs none of them)
            specs = (tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32))
            graphs = [adapter._one_step.get_concrete_function(*specs).graph,
                      adapter._apply_step.get_concrete_function([tf.TensorSpec(v.shape, v.dtype)
                                                                 for v in model.trainable_variables]).graph]
            record[f"{key}_collectives"] = sorted({op.name for g in graphs for op in g.get_operations()
                                                   if op.type.startswith("Horovod")})
    # Which example ids this rank reads in epochs 0 and 1 (column 0 carries the id).
    record[f"{source_name}_ids"] = [[int(x[0]) for x, _ in source.rank_dataset(result.rank, result.world_size, 0, e)]
                                    for e in (0, 1)]
# An Embedding's gradient is IndexedSlices; 49 examples on 2 ranks leave rank 1 without a sample in the last
# step (zeros). Both must still meet in one collective, in the loop and in fit (a mismatch would hang).
tokens = np.arange(49, dtype=np.int64)[:, None] % 7
for mode in ("loop", "fit"):
    keras.utils.set_random_seed(5)
    emb = keras.Sequential([keras.Input(shape=(1,), dtype="int64"), keras.layers.Embedding(7, 4),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    emb_opt = keras.optimizers.SGD(0.05)
    if mode == "fit":
        emb.compile(optimizer=emb_opt, loss=LOSS)
        emb_adapter = KerasFitAdapter(emb)
    else:
        emb_adapter = KerasAdapter(emb, emb_opt, LOSS)
    emb_result = Trainer(emb_adapter, TrainConfig(**cfg)).fit(
        TFStream(tf.data.Dataset.from_tensor_slices((tokens, Y[:49])), n=49))
    record[f"embedding_{mode}"] = {"steps": emb_result.global_step, "samples": emb_result.train_samples_per_epoch}
# A two-input model (a dict of inputs) through the same uneven stream, in the loop: rank 1's empty last step runs
# on the stand-in row, a dict of one-row inputs.
keras.utils.set_random_seed(5)
a, b = keras.Input(shape=(4,), name="a"), keras.Input(shape=(2,), name="b")
two = keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(keras.layers.Concatenate()([a, b])))
try:
    two_result = Trainer(KerasAdapter(two, keras.optimizers.SGD(0.05), LOSS), TrainConfig(**cfg)).fit(
        TFStream(tf.data.Dataset.from_tensor_slices(({"a": X[:49, :4], "b": X[:49, 4:]}, Y[:49])), n=49))
    record["two_inputs_loop"] = {"steps": two_result.global_step, "samples": two_result.train_samples_per_epoch,
                                 "finite": bool(np.isfinite(flat(two)).all())}
except Exception as e:   # every rank's own record says why; the other checks above still report
    record["two_inputs_loop"] = {"crash": f"{type(e).__name__}: {e}"[:2000]}
record["rank"], record["size"] = result.rank, result.world_size
with open(os.path.join(out_dir, f"rank{result.rank}.json"), "w") as f:
    json.dump(record, f)
