"""The ResNet examples (convolutions, BatchNorm, residual adds, dropout, AdamW) reach 95% on the digits test
split at 1 and 2 workers, with and without --sync-batchnorm, under both launchers and both Keras modes.

Each launch prints one line with its accuracy, samples/s and wall time (shown with ``pytest -s``).
"""
import json
import time

import pytest

from proc import explain, launch

SCRIPTS = {"torch": "examples/torch_resnet.py", "tensorflow": "examples/keras_resnet.py"}
DEFAULT_EPOCHS, DEFAULT_BATCH = 10, 32   # the examples' defaults

# (framework, workers, launcher, extra flags): 6 launches cover 1/2 workers, both launchers, per-rank and
# synchronised BatchNorm, and Keras fit and loop at 2 workers (the loop with SyncBatchNorm is in the zoo suite).
RUNS = [
    ("torch", 1, "horovodrun", []),
    ("torch", 2, "horovodrun", []),
    ("torch", 2, "mpirun", ["--sync-batchnorm"]),
    ("tensorflow", 1, "horovodrun", ["--mode", "fit"]),
    ("tensorflow", 2, "horovodrun", ["--mode", "loop"]),
    ("tensorflow", 2, "mpirun", ["--mode", "fit", "--sync-batchnorm"]),
]


@pytest.mark.parametrize("framework, np_, launcher, flags", RUNS,
                         ids=[f"{f}-np{n}-{l}" + "".join("-" + x.lstrip("-") for x in flags if x != "--mode")
                              for f, n, l, flags in RUNS])
def test_resnet_reaches_95_percent(tmp_path, framework, np_, launcher, flags):
    metrics = tmp_path / "m.json"
    start = time.monotonic()
    result = launch(SCRIPTS[framework], flags + ["--metrics-json", str(metrics)], np=np_, launcher=launcher,
                    timeout=300)
    wall = time.monotonic() - start
    assert result.returncode == 0, explain(result)
    m = json.loads(metrics.read_text())
    print(f"\n{SCRIPTS[framework]} {' '.join(flags)} np={np_} {launcher}: test accuracy {m['test_accuracy']:.4f}, "
          f"{m['samples_per_sec']:.0f} samples/s, {wall:.1f} s wall", flush=True)
    assert m["framework"] == framework and m["world_size"] == np_
    assert m["sync_batchnorm"] == ("--sync-batchnorm" in flags)
    if framework == "tensorflow":
        assert m["mode"] == flags[flags.index("--mode") + 1]
    assert m["epochs"] == DEFAULT_EPOCHS and m["global_batch_size"] == DEFAULT_BATCH * np_
    assert m["train_samples_per_epoch"] == 1437          # summed over ranks: the whole train split
    assert m["test_samples"] == 360                      # each test sample counted once
    assert m["test_accuracy"] >= 0.95, explain(result)
    assert m["samples_per_sec"] > 0
