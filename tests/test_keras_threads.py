"""Keras workers really run with one compute thread: read back from TensorFlow in a fresh interpreter."""
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

FIT = """
import numpy as np
from hvdkit import TrainConfig, Trainer
from hvdkit.keras import KerasAdapter, LocalProcess
import keras, tensorflow as tf
model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(2)])   # runs TF ops: pools fixed now
x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
Trainer(KerasAdapter(model, keras.optimizers.SGD(0.1), loss), TrainConfig(progress_bar=False, threads=THREADS),
        process=LocalProcess()).fit((x, y))
print("threads", tf.config.threading.get_intra_op_parallelism_threads(),
      tf.config.threading.get_inter_op_parallelism_threads())
"""


def run(code, env=None):
    import os
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})))


def test_tf_runs_with_one_thread_although_the_model_was_built_first():
    done = run(FIT.replace("THREADS", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "threads 1 1" in done.stdout


def test_asking_for_other_threads_after_tf_started_is_one_clear_error():
    code = "from hvdkit.scripting import main_guard\nmain = main_guard(lambda: exec(CODE))\nmain()"
    done = run(code.replace("CODE", repr(FIT.replace("THREADS", "2"))))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "hvdkit: error: TensorFlow already runs with 1/1 intra/inter-op threads, not the 2 asked" in done.stderr
    assert "HVDKIT_THREADS=2" in done.stderr
    with_env = run(FIT.replace("THREADS", "2"), env={"HVDKIT_THREADS": "2"})
    assert with_env.returncode == 0 and "threads 2 2" in with_env.stdout, with_env.stderr[-3000:]
