"""Training-loop features at 2 workers under a launcher, on the digits examples run as a user runs them: user and
compiled metrics exact over the whole test set, the best k checkpoints, early stopping decided alike on every
rank, bf16 within 1 point of fp32. (LR schedules and clipping at 2 workers: tests/test_lr_and_clipping.py;
non-finite steps: tests/test_metrics_best_nonfinite.py.)

The example runs three times at 2 workers (tests/workers/runs.py; every rank records what its ``fit`` returned),
in the shared launch of its framework under its launcher (tests/conftest.py, ``shared_runs``): fp32 keeping the
best 2 checkpoints, bf16, and a short run that early stopping ends. Metrics and kept checkpoints are read back and
checked against the saved models evaluated here, in one process, on the whole test set.
"""
import importlib.util
import io
import json
import os

import numpy as np
import pytest

from hvdkit.checkpoint import BestStore, CheckpointStore
from hvdkit.datasets import digits_split
from proc import REPO

_, _, X_TEST, Y_TEST = digits_split()
# nothing beats epoch 1's accuracy by more than 1.0: with patience 2 the run stops after epoch 3, on every rank
EARLY = ["--limit-train", "400", "--epochs", "10", "--monitor", "eval_accuracy", "--monitor-mode", "max",
         "--min-delta", "1.0", "--early-stopping-patience", "2"]
SETUPS = {"torch": ("torch_digits.py", "horovodrun", "20"), "keras": ("keras_digits.py", "mpirun", "8")}
RUNS = {"fp32": lambda epochs: ["--epochs", epochs, "--checkpoint-dir", "{out}/a", "--keep-best", "2"],
        "bf16": lambda epochs: ["--epochs", epochs, "--precision", "bf16"],
        "early": lambda epochs: [*EARLY, "--checkpoint-dir", "{out}/c", "--keep-best", "1"]}
SHARED_RUNS = {f"loop-{framework}-{run}": dict(
    framework="torch" if framework == "torch" else "tensorflow", launcher=launcher, np=2, order=40,
    script=f"examples/{script}", args=[*flags(epochs), "--no-progress", "--metrics-json", "{out}/m.json"],
    timeout=150) for framework, (script, launcher, epochs) in SETUPS.items() for run, flags in RUNS.items()}


@pytest.fixture(scope="module", params=sorted(SETUPS))
def job(request, shared_runs):
    framework = request.param
    pytest.importorskip("torch" if framework == "torch" else "tensorflow")
    runs = [shared_runs.get(f"loop-{framework}-{run}") for run in RUNS]
    metrics = [json.loads((run.out / "m.json").read_text()) for run in runs]
    ranks = [[json.loads(path.read_text()) for path in run.records] for run in runs]
    assert all(len(r) == 2 for r in ranks), [run.records for run in runs]
    return {"framework": framework, "dirs": [run.out for run in runs], "metrics": metrics, "ranks": ranks,
            "output": runs[2].result.stderr}


def example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logits_of(framework, blob):
    """The saved model's logits on the whole test set, computed here in one process."""
    if framework == "torch":
        import torch
        model = example("torch_digits").make_model()
        model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True)["model"])
        with torch.no_grad():
            return model.eval()(torch.from_numpy(X_TEST)).double().numpy()
    from hvdkit.keras import use_precision   # first: it sizes TF's thread pools before any op, as users do
    import keras
    use_precision("fp32")
    model = example("keras_digits").make_model(keras)
    saved = np.load(io.BytesIO(blob))
    for i, v in enumerate(model.variables):
        v.assign(saved[f"model/{i}"])
    return np.asarray(model(X_TEST, training=False), dtype=np.float64)


def scores(logits):
    """accuracy, top-3 accuracy and mean cross entropy, in numpy."""
    ranked = np.argsort(-logits, axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {"accuracy": float(np.mean(ranked[:, 0] == Y_TEST)),
            "top3": float(np.mean((ranked[:, :3] == Y_TEST[:, None]).any(axis=1))),
            "loss": float(-log_probs[np.arange(len(Y_TEST)), Y_TEST].mean())}


def test_metrics_are_exact_over_the_whole_test_set(job):
    """The final model, evaluated here on all 360 test samples, scores what the 2-worker run reported: each sample
    counted once, none padded in (180 per rank, evaluated in batches of 32: the last batch is short)."""
    final = job["metrics"][0]
    blob, manifest = CheckpointStore(str(job["dirs"][0] / "a")).load_latest()
    assert manifest["epoch"] == final["epochs"] and manifest["world_size"] == 2
    expected, last = scores(logits_of(job["framework"], blob)), final["history"][-1]
    assert last["eval_samples"] == 360 and final["test_samples"] == 360
    assert round(last["eval_accuracy"] * 360) == round(expected["accuracy"] * 360)
    assert round(last["eval_top3"] * 360) == round(expected["top3"] * 360) and last["eval_top3"] > last["eval_accuracy"]
    assert last["eval_loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_the_best_two_checkpoints_are_the_best_two_evaluations(job):
    history = job["metrics"][0]["history"]
    best_two = sorted(history, key=lambda h: (h["eval_loss"], h["epoch"]))[:2]
    kept = BestStore(str(job["dirs"][0] / "a" / "best"), keep=2).ranked()
    assert [e for _, e, _, _ in kept] == [h["epoch"] for h in best_two]
    assert [v for v, _, _, _ in kept] == pytest.approx([h["eval_loss"] for h in best_two], rel=1e-12)
    # the best file holds that epoch's model: evaluated here, it scores the recorded loss
    best = BestStore(str(job["dirs"][0] / "a" / "best"), keep=2)
    blob, manifest = best.verify(kept[0][2])
    assert scores(logits_of(job["framework"], blob))["loss"] == pytest.approx(manifest["monitor_value"], rel=1e-4)
    records = [r["best"] for r in job["ranks"][0]]
    assert records[0] == records[1] == job["metrics"][0]["best"] and records[0]["epoch"] == kept[0][1]


def test_early_stopping_ends_every_rank_after_the_same_evaluation(job):
    ranks = job["ranks"][2]
    for r in ranks:
        assert (r["stopped_early"], r["epochs"]) == (True, 3), r
        assert (r["best"]["epoch"], r["best"]["bad"], r["best"]["monitor"]) == (1, 2, "eval_accuracy"), r
    assert ranks[0]["best"] == ranks[1]["best"] and ranks[0]["global_step"] == ranks[1]["global_step"]
    assert job["metrics"][2]["stopped_early"] and len(job["metrics"][2]["history"]) == 3
    # the kept best is the highest accuracy as it is (min_delta is early stopping's, as in Lightning); ties: older
    history = job["metrics"][2]["history"]
    top = max(history, key=lambda h: (h["eval_accuracy"], -h["epoch"]))
    assert [e for _, e, _, _ in BestStore(str(job["dirs"][2] / "c" / "best"), keep=1).ranked()] == [top["epoch"]]
    assert CheckpointStore(str(job["dirs"][2] / "c")).load_latest()[1]["epoch"] == 3
    assert "early stopping after epoch 3: eval_accuracy has not improved by more than 1" in job["output"]


def test_bf16_reaches_fp32_accuracy_within_one_point(job):
    fp32, bf16 = job["metrics"][0], job["metrics"][1]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["world_size"] == 2 and bf16["test_samples"] == 360 and bf16["test_accuracy"] >= 0.95
    assert abs(bf16["test_accuracy"] - fp32["test_accuracy"]) <= 0.01, (fp32["test_accuracy"], bf16["test_accuracy"])
    print(f"{job['framework']} 2 workers: accuracy fp32 {fp32['test_accuracy']:.4f} bf16 {bf16['test_accuracy']:.4f}; "
          f"samples/s bf16/fp32 {bf16['samples_per_sec'] / fp32['samples_per_sec']:.2f}")
