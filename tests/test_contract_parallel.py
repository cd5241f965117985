"""The adapter contract, one test suite for every adapter: torch, Keras GradientTape loop, Keras model.fit.

Each (adapter, launcher) pair is one run of tests/workers/contract_checks.py on 2 real workers, in the shared
launch of its framework under that launcher (tests/conftest.py, ``shared_runs``; one framework per
interpreter); each test below asserts one of its outcomes. torch under both launchers; each Keras adapter under one
(the loop under horovodrun, fit under mpirun): both launchers start the same MPI controller for a static job, and a
second Keras run of the contract costs 10-18 s.
"""
import json

import pytest

TOLERANCE = 1e-5
PAIRS = [("torch", "horovodrun"), ("torch", "mpirun"), ("keras-loop", "horovodrun"), ("keras-fit", "mpirun")]
SHARED_RUNS = {f"contract-{backend}-{launcher}": dict(
    framework="torch" if backend == "torch" else "tensorflow", launcher=launcher, np=2, order=10,
    script="tests/workers/contract_checks.py", args=[backend, "{out}"], timeout=300)
    for backend, launcher in PAIRS}


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def ranks(request, shared_runs):
    backend, launcher = request.param
    out = shared_runs.get(f"contract-{backend}-{launcher}").out
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["backend"] == backend for r in records)
    return records


def test_two_workers_equal_one_worker_with_double_batch(ranks):
    for r in ranks:
        assert r["size"] == 2
        assert r["equiv_plain_maxdiff"] < TOLERANCE
        assert r["equiv_accumulation_maxdiff"] < TOLERANCE


def test_uneven_data_trains_every_sample_and_finishes(ranks):
    # 50 samples, 2 workers x batch 4: 7 steps per epoch (the last holds 2 samples), 3 epochs
    for r in ranks:
        assert r["equiv_plain_steps"] == 3 * 7
        assert r["equiv_plain_samples"] == 50
        assert r["equiv_accumulation_steps"] == 3 * 4  # 16 samples per step with 2 passes
        assert r["equiv_accumulation_samples"] == 50


def test_ranks_hold_identical_parameters(ranks):
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_fp16_compression_stays_close_and_ranks_identical(ranks):
    assert ranks[0]["fp16_checksum"] == ranks[1]["fp16_checksum"]
    for r in ranks:
        # measured ~2e-4 to 4e-4 (the exact path: ~1e-7): lossy on the wire, so it really is compressed
        assert 1e-5 < r["fp16_maxdiff"] < 5e-3


def test_exact_evaluation_counts_each_sample_once(ranks):
    for r in ranks:
        assert r["eval"]["samples"] == 37
        assert r["eval"]["accuracy"] == pytest.approx(r["eval_expected_accuracy"], abs=1e-6)
        assert r["eval"]["loss"] == pytest.approx(r["eval_expected_loss"], abs=1e-5)


def test_resume_mid_epoch_gives_the_uninterrupted_result(ranks):
    for r in ranks:
        assert r["resume_stopped_early"] is True
        assert r["resume_from"] == {"epoch": 1, "position": 16, "global_step": 9}
        assert r["resume_final_step"] == 21
        assert r["resume_maxdiff"] == 0.0


def test_corrupt_checkpoint_is_reported_not_loaded(ranks):
    assert ranks[0]["corrupted_file"] == "ckpt-00000002.bin"
    for r in ranks:
        assert r["fallback_resumed_from"] == "ckpt-00000001.bin"
        assert r["fallback_epochs"] == 4
        assert r["all_corrupt_error"] and "corrupt" in r["all_corrupt_error"]


def test_divergence_check_names_rank_and_tensor(ranks):
    perturbed = ranks[1]["perturbed"]
    assert perturbed
    for r in ranks:
        assert "rank 1" in r["divergence_error"] and perturbed in r["divergence_error"]


def test_a_second_fit_of_the_same_adapter_continues_the_first(ranks):
    # 2 epochs, then 1 more with 2-step accumulation (Keras fit: none; it is fixed when the optimizer is built),
    # against one reference run: momentum and weights carry over, and a second fit wraps nothing twice (torch:
    # Horovod's optimizer once, its hooks stay on the parameters)
    for r in ranks:
        assert "error" not in r["second_fit"], r["second_fit"]
        assert r["second_fit"]["maxdiff"] < TOLERANCE, r["second_fit"]
        assert r["second_fit"]["accumulation"] == (1 if r["backend"] == "keras-fit" else 2)
        # 50 samples, 2 workers x batch 4 x the micro-batches a step: 4 steps with 2, 7 with 1
        assert r["second_fit"]["steps"] == {2: 4, 1: 7}[r["second_fit"]["accumulation"]], r["second_fit"]
        # the first fit sharded (ZeRO), the second not: the same result, from the first's gathered state
        assert r["second_fit_after_sharded"].get("maxdiff", 1.0) < TOLERANCE, r["second_fit_after_sharded"]


def test_a_sharded_fit_after_a_horovod_wrapped_one_is_refused_in_one_line(ranks):
    # torch only: Horovod's DistributedOptimizer leaves its hooks on the parameters for good (2 workers: wrapped)
    if ranks[0]["backend"] != "torch":
        pytest.skip("torch only: the Keras adapters wrap no optimizer")
    for r in ranks:
        message = r["sharded_after_wrapped"]
        assert message and "\n" not in message and "build a new TorchAdapter" in message, message
        # a layer unfrozen after the first fit: Horovod's wrapper averages a fixed set of parameters
        message = r["unfrozen_after_wrapped"]
        assert message and "\n" not in message and "require grad" in message and "new TorchAdapter" in message, message
        # a fit stopped between backward and the step (injected): its allreduces were never synchronized, and the
        # next fit on that adapter is refused (under Adasum its parameters would hold a partial update)
        assert r["stopped_mid_step"] == "injected: stopped after the backward pass", r["stopped_mid_step"]
        message = r["fit_after_stopped_mid_step"]
        assert message and "\n" not in message and "between the backward pass and the optimizer step" in message, \
            message
