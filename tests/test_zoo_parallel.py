"""The model zoo on every adapter: models people train, each on 2 real workers, checked against one process
where that is defined (SyncBatchNorm, no dropout) and for agreement between ranks everywhere else.

One run of tests/workers/zoo_checks.py per adapter (torch, Keras GradientTape loop, Keras model.fit) at 2
workers under horovodrun, plus one torch run at 3 workers under mpirun (a sparse Embedding when two ranks hold
no sample in the last step); the 2-worker runs are part of their framework's shared horovodrun launch
(tests/conftest.py, ``shared_runs``). Every value a test asserts was read back from the framework in the worker
(parameters, running statistics, optimizer state, dropout masks, checkpoint contents); each test asserts one
outcome over the module-scoped run.
"""
import json

import pytest

TOLERANCE = 1e-5
BACKENDS = ["torch", "keras-loop", "keras-fit"]
SHARED_RUNS = {f"zoo-{backend}": dict(framework="torch" if backend == "torch" else "tensorflow", launcher="horovodrun",
                                      np=2, order=30, script="tests/workers/zoo_checks.py", args=[backend, "{out}"],
                                      timeout=240) for backend in BACKENDS}
SHARED_RUNS["zoo-torch3"] = dict(framework="torch", launcher="mpirun", np=3, order=30,
                                 script="tests/workers/zoo_checks.py", args=["torch", "{out}", "token,token_sparse"],
                                 timeout=240)


def _records(shared_runs, name, backend, np):
    out = shared_runs.get(name).out
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]
    assert [r["rank"] for r in records] == list(range(np)) and all(r["backend"] == backend for r in records)
    return records


@pytest.fixture(scope="module", params=BACKENDS)
def ranks(request, shared_runs):
    return _records(shared_runs, f"zoo-{request.param}", request.param, 2)


@pytest.fixture(scope="module")
def three_ranks(shared_runs):
    return _records(shared_runs, "zoo-torch3", "torch", 3)


def scenario(ranks, name):
    """Every rank's record of one scenario (a scenario that raised fails the test with its traceback)."""
    records = [r[name] for r in ranks]
    for rank, rec in enumerate(records):
        assert "crash" not in rec, f"rank {rank}: {rec['crash']}"
    return records


def backend(ranks):
    return ranks[0]["backend"]


# ---- 1. BatchNorm CNN with SyncBatchNorm ---------------------------------------------------------------------
def test_sync_batchnorm_cnn_equals_one_process_with_double_batch(ranks):
    for r in scenario(ranks, "bn_sync"):
        assert r["world"] == 2 and r["steps"] == 2 * 8  # 60 images, 8 per step: the last step holds 4
        assert r["layer_types"] == (["SyncBatchNorm"] if backend(ranks) == "torch" else ["SyncBatchNormalization"])
        assert r["params_maxdiff"] < TOLERANCE


def test_sync_batchnorm_running_statistics_equal_one_process(ranks):
    for r in scenario(ranks, "bn_sync"):
        assert r["stats_moved"] > 0.01  # they really were trained (measured: torch 0.76, Keras 0.14)
        assert r["stats_maxdiff"] < TOLERANCE
        assert r["batches_tracked"] == r["ref_batches_tracked"]


def test_sync_batchnorm_ranks_hold_identical_parameters_and_statistics(ranks):
    a, b = scenario(ranks, "bn_sync")
    assert a["params_crc"] == b["params_crc"]
    assert a["stats"] == b["stats"]


def test_sync_batchnorm_with_an_empty_rank_equals_one_process(ranks):
    # 57 images: the last step holds 1 sample, on rank 0; rank 1 joins with no sample. Keras runs it on a weight-0
    # stand-in row, never on zero rows: TF's oneDNN Conv2D mishandles those on some CPUs (README "Empty ranks")
    assert_empty_rank_equals_one_process(ranks, "bn_sync_empty")


def test_sync_batchnorm_with_a_micro_batch_idle_on_every_rank_equals_one_process(ranks):
    # Keras, accumulation 2, 49 images: the last step is [1, 0] samples on rank 0 and [0, 0] on rank 1
    if backend(ranks) == "torch":
        pytest.skip("Keras only")
    a, b = scenario(ranks, "bn_sync_idle_everywhere")
    assert (a["last_micro_batches"], b["last_micro_batches"]) == ([1, 0], [0, 0])
    assert_empty_rank_equals_one_process(ranks, "bn_sync_idle_everywhere")


def test_a_pooled_cnn_with_an_empty_rank_equals_one_process(ranks):
    # two convolutions and max pooling, no BatchNorm: on zero rows TF's oneDNN MaxPool gradient aborts the process
    # on some CPUs (README "Empty ranks"); Keras runs the idle rank on a stand-in row instead
    a = assert_empty_rank_equals_one_process(ranks, "pool_empty")
    assert not a["layer_types"]   # no BatchNorm: the stand-in row alone


def assert_empty_rank_equals_one_process(ranks, name):
    a, b = scenario(ranks, name)
    assert (a["last_step_samples"], b["last_step_samples"]) == (1, 0)
    assert a["params_crc"] == b["params_crc"] and a["stats_crc"] == b["stats_crc"]
    for r in (a, b):
        assert r["params_maxdiff"] < TOLERANCE and r["stats_maxdiff"] < TOLERANCE, (
            f"{backend(ranks)}: parameters {r['params_maxdiff']:.2e}, statistics {r['stats_maxdiff']:.2e} "
            "away from one process")
    return a


def test_sync_batchnorm_after_a_dense_layer_with_an_empty_rank_equals_one_process(ranks):
    # Keras: SyncBatchNormalization's empty-rank path after a dense layer
    if backend(ranks) == "torch":
        pytest.skip("Keras only: torch's empty rank is bn_sync_empty's")
    a = assert_empty_rank_equals_one_process(ranks, "bn_sync_empty_dense")   # the last step's 1 sample on rank 0
    assert "Sync" in " ".join(a["layer_types"]), a["layer_types"]


def test_plain_torch_batchnorm_refuses_a_one_sample_batch_up_front(ranks):
    if backend(ranks) != "torch":
        pytest.skip("only torch BatchNorm cannot train on one sample")
    for r in scenario(ranks, "bn_sync_empty"):
        assert r["plain_error"] and "BatchNorm" in r["plain_error"] and "sync_batchnorm" in r["plain_error"]


# ---- 2. BatchNorm CNN without sync ----------------------------------------------------------------------------
def test_local_batchnorm_trains_without_divergence_error(ranks):
    for r in scenario(ranks, "bn_local"):
        assert r["error"] is None
        assert r["steps"] == 16
        # not synchronised (keras-fit: BatchNormalization that skips empty batches, see hvdkit.keras.sync_batchnorm)
        expected = {"torch": ["BatchNorm2d"], "keras-loop": ["BatchNormalization"],
                    "keras-fit": ["EmptySafeBatchNormalization"]}[backend(ranks)]
        assert r["layer_types"] == expected


def test_local_batchnorm_statistics_averaged_identical_on_every_rank(ranks):
    a, b = scenario(ranks, "bn_local")
    assert a["last_step_stats"] != b["last_step_stats"]  # each rank's own batches before the averaging
    assert a["stats"] == b["stats"] and a["stats_crc"] == b["stats_crc"]
    assert a["params_crc"] == b["params_crc"]


def test_local_batchnorm_is_not_sync_batchnorm(ranks):
    for r in scenario(ranks, "bn_local"):
        assert r["params_vs_sync_reference"] > 1e-3  # local batch statistics: a different model than case 1


def test_local_batchnorm_evaluation_equals_one_process_on_every_rank(ranks):
    a, b = scenario(ranks, "bn_local")
    assert a["eval"] == b["eval"]
    for r in (a, b):
        assert r["eval"]["samples"] == 37
        assert r["eval"]["accuracy"] == pytest.approx(r["expected_accuracy"], abs=1e-6)
        assert r["eval"]["loss"] == pytest.approx(r["expected_loss"], abs=TOLERANCE)


def test_local_batchnorm_checkpoint_holds_the_averaged_statistics(ranks):
    a, b = scenario(ranks, "bn_local")
    assert a["ckpt_file"] == "ckpt-00000001.bin"  # the end of epoch 2 (numbered from 0)
    assert a["ckpt_stats_maxdiff"] == 0.0
    assert a["ckpt_stats"] == a["stats"] == b["stats"]


# ---- 3. Dropout MLP ---------------------------------------------------------------------------------------------
def test_dropout_ranks_hold_identical_parameters(ranks):
    a, b = scenario(ranks, "dropout")
    assert a["params_crc_first"] == b["params_crc_first"]


def test_dropout_stream_is_each_ranks_own(ranks):
    a, b = scenario(ranks, "dropout")
    for r in (a, b):
        assert 0 < sum(r["mask_first"]) < len(r["mask_first"])  # a real mask, rate 0.5
    assert a["mask_first"] != b["mask_first"]


def test_dropout_stream_is_reproducible(ranks):
    for r in scenario(ranks, "dropout"):
        assert r["mask_again"] == r["mask_first"]
        assert r["params_crc_again"] == r["params_crc_first"]


# ---- 4. Adam and AdamW: optimizer state after the first step ------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optimizer_state_identical_on_ranks_that_started_apart(ranks, optimizer):
    a, b = (r[optimizer] for r in scenario(ranks, "optimizers"))
    assert a["init_crc"] != b["init_crc"]  # each rank built its own initial model
    assert a["state_names"] == b["state_names"] and a["state_crc"] == b["state_crc"]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optimizer_state_equals_one_process_after_one_step(ranks, optimizer):
    for r in (rec[optimizer] for rec in scenario(ranks, "optimizers")):
        assert r["global_step"] == 1
        assert r["optimizer_type"].lower() == optimizer
        assert r["state_absmax"] > 0  # moments were really written
        assert r["state_maxdiff"] < TOLERANCE
        assert r["params_maxdiff"] < TOLERANCE


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optimizer_step_count_is_one(ranks, optimizer):
    # hvd.broadcast_optimizer_state's dummy step would make it 2 (and apply AdamW's decay once more)
    for r in (rec[optimizer] for rec in scenario(ranks, "optimizers")):
        assert r["step_counts"] and set(r["step_counts"]) == {1.0} and r["ref_step_counts"] == r["step_counts"]


# ---- 5. LayerNorm + Embedding -------------------------------------------------------------------------------------
def test_layernorm_embedding_model_equals_one_process(ranks):
    a, b = scenario(ranks, "token")
    assert (a["last_step_samples"], b["last_step_samples"]) == (1, 0)  # 49 samples: rank 1 holds none at the end
    assert a["params_crc"] == b["params_crc"]
    for r in (a, b):
        assert r["samples"] == 49 and r["steps"] == 2 * 7
        assert r["params_maxdiff"] < TOLERANCE


def test_sparse_embedding_two_workers_equals_one_process(ranks):
    if backend(ranks) != "torch":
        pytest.skip("nn.Embedding(sparse=True) is torch's")
    a, b = scenario(ranks, "token_sparse")
    assert a["sparse_embedding"] and (a["last_step_samples"], b["last_step_samples"]) == (1, 0)
    assert a["params_crc"] == b["params_crc"]
    assert a["params_maxdiff"] < TOLERANCE and b["params_maxdiff"] < TOLERANCE


@pytest.mark.parametrize("name", ["token", "token_sparse"])
def test_three_workers_two_without_a_sample_finish_and_equal_one_process(three_ranks, name):
    records = scenario(three_ranks, name)
    assert [r["last_step_samples"] for r in records] == [1, 0, 0]
    assert len({r["params_crc"] for r in records}) == 1
    for r in records:
        assert r["world"] == 3 and r["samples"] == 49 and r["steps"] == 2 * 5
        assert r["sparse_embedding"] == (name == "token_sparse")
        assert r["params_maxdiff"] < TOLERANCE


# ---- 6/7. Regularized models --------------------------------------------------------------------------------------
def test_regularized_model_equals_one_process(ranks):
    records = scenario(ranks, "regularized")
    if backend(ranks) == "torch":  # AdamW's decoupled weight decay
        records = [r["adamw"] for r in records]
        assert all(r["weight_decay"] == [0.1] for r in records)
    else:  # L2 kernel_regularizer: one process trains on loss + sum(model.losses)
        records = [r["l2_accumulation1"] for r in records]
        assert all(r["regularization_losses"] == 2 for r in records)
    assert records[0]["params_crc"] == records[1]["params_crc"]
    for r in records:
        assert r["unregularized_maxdiff"] > 1e-3  # without the regularization the result is far off
        assert r["params_maxdiff"] < TOLERANCE


def test_keras_regularized_model_with_accumulation_equals_one_process(ranks):
    if backend(ranks) == "torch":
        pytest.skip("Keras regularization losses with gradient accumulation")
    records = [r["l2_accumulation2"] for r in scenario(ranks, "regularized")]
    assert records[0]["params_crc"] == records[1]["params_crc"]
    for r in records:
        assert r["steps"] == 2 * 4  # 16 samples per step, the last holds 1
        assert r["params_maxdiff"] < TOLERANCE


# ---- 8. torch: gradient buckets give the numbers of Horovod's DistributedOptimizer ---------------------------
def test_gradient_buckets_equal_horovods_wrapper_with_an_unused_layer_and_fp16(shared_runs):
    records = scenario(_records(shared_runs, "zoo-torch", "torch", 2), "reducers")
    for compression in ("none", "fp16"):
        recs = [r[compression] for r in records]
        for r in recs:
            # read back from torch: buckets hook every parameter and keep the user's optimizer; Horovod's wraps it
            assert r["buckets_hooked"] == r["tensors"] and not r["buckets_wrapped"]
            assert r["horovod_hooked"] == 0 and r["horovod_wrapped"]
            assert r["buckets_steps"] == r["horovod_steps"] == 2 * 4   # 60 images, 2 x 4 x 2 a step
            assert r["buckets_moved"] > 1e-3 and r["buckets_extra_moved"] > 1e-4   # rank 0's layer trained
            assert r["maxdiff"] < 1e-6, (compression, r["maxdiff"])
            # 3 buckets, the unused layer's bias and weight (and the last fc bias) first: another order on each rank
            assert r["buckets_buckets"] == 3 and r["buckets_first_bucket"] == [[10], [10, 10], [10]], r
            assert r["horovod_buckets"] == 0
        assert recs[0]["params_crc"] == recs[1]["params_crc"]   # the ranks agree
