"""tf.data inputs (a pipeline, and uneven TFRecord files read whole) sharded by rank, on 2 real workers.

One run of tests/workers/tfdata_checks.py under horovodrun (what ``hvdkit launch`` starts), in the shared Keras launch
(tests/conftest.py, ``shared_runs``); each test asserts one outcome. Under mpirun the same MPI controller runs it
(static horovodrun is mpirun underneath): the 22 s a second run cost told nothing new; the launchers' own
differences (rank variables, environment) are the other shared runs' and tests/test_launch.py's.
"""
import json

import pytest

N = 50
KEYS = ["files_fit", "files_loop", "stream_fit", "stream_loop"]
LAUNCHERS = ["horovodrun"]
SHARED_RUNS = {f"tfdata-{launcher}": dict(framework="tensorflow", launcher=launcher, np=2, order=20,
                                          script="tests/workers/tfdata_checks.py", args=["{out}"], timeout=300)
               for launcher in LAUNCHERS}


@pytest.fixture(scope="module", params=LAUNCHERS)
def ranks(request, shared_runs):
    out = shared_runs.get(f"tfdata-{request.param}").out
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("source", ["files", "stream"])
def test_shards_are_an_exact_partition_reshuffled_each_epoch(ranks, source):
    for epoch in (0, 1):
        ids = [i for r in ranks for i in r[f"{source}_ids"][epoch]]
        assert sorted(ids) == list(range(N))               # every example on exactly one rank
    for r in ranks:
        first, second = r[f"{source}_ids"]
        assert sorted(first) == sorted(second) and first != second   # same shard, new order


def test_files_are_read_whole_by_one_rank(ranks):
    # files of 7, 12, 9, 15, 7 examples: rank 0 reads files 0, 2, 4 (ids 0-6, 19-27, 43-49), rank 1 the others
    assert sorted(ranks[0]["files_ids"][0]) == list(range(0, 7)) + list(range(19, 28)) + list(range(43, 50))
    assert len(ranks[1]["files_ids"][0]) == 27


@pytest.mark.parametrize("key", KEYS)
def test_uneven_shards_train_everything_in_equal_steps(ranks, key):
    for r in ranks:
        result = r[key]
        assert result["samples"] == N
        # the larger shard decides: ceil(27 / 4) = 7 steps per epoch (files), ceil(25 / 4) = 7 (stream), 2 epochs
        assert result["steps"] == 14


@pytest.mark.parametrize("key", KEYS)
def test_gradients_equal_one_process_over_the_same_batches(ranks, key):
    for r in ranks:
        assert r[key]["maxdiff"] < 1e-5


@pytest.mark.parametrize("key", KEYS)
def test_exact_evaluation_over_a_stream(ranks, key):
    for r in ranks:
        assert r[key]["eval_samples"] == 37
        assert r[key]["eval_accuracy"] == pytest.approx(r[key]["expected_accuracy"], abs=1e-9)


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_embedding_gradients_with_an_empty_rank_do_not_hang(ranks, mode):
    # 49 examples, batch 4: shards of 25 and 24, 7 steps; in the last one rank 1 has nothing to train
    for r in ranks:
        assert r[f"embedding_{mode}"] == {"steps": 14, "samples": 49}


def test_a_two_input_model_trains_through_a_ranks_empty_last_step(ranks):
    # the same 49 examples as a dict of two inputs: rank 1's last step is empty; it runs on the stand-in (the
    # stream's first example, every input of the dict), flagged
    for r in ranks:
        assert r["two_inputs_loop"] == {"steps": 14, "samples": 49, "finite": True}


@pytest.mark.parametrize("source", ["files", "stream"])
def test_loop_gradient_allreduce_has_one_name_that_elastic_recognises(ranks, source):
    # One name in the fused step and in the zero-gradient step (ranks on either graph pair up), and the one
    # place that classifies TF errors calls an error naming that node a lost peer (so elastic rolls back).
    tf = pytest.importorskip("tensorflow")
    from hvdkit.keras.process import GRADIENT_ALLREDUCE, is_peer_lost
    for r in ranks:
        assert r[f"{source}_loop_collectives"] == [GRADIENT_ALLREDUCE]
        for name in r[f"{source}_loop_collectives"]:
            lost = tf.errors.UnknownError(None, None, f"Connection closed by peer [127.0.0.1]:40813 [[{{{{node {name}}}}}]]")
            assert is_peer_lost(lost), name
