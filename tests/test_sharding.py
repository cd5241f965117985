"""Shard arithmetic (hvdkit.sharding), every rank simulated in a loop in one process."""
import random

import numpy as np
import pytest

from hvdkit.errors import HvdkitError
from hvdkit.sharding import even_sizes, stream_consumed, stream_plan, stream_segments
from hvdkit.sharding import (check_train_config, epoch_permutation, eval_indices, plan_epoch,
                             shard_files, steps_per_epoch)


# ---------------------------------------------------------------- helpers

def all_plans(n, world, batch, acc=1, seed=0, epoch=0, start=0, shuffle=True):
    """One plan per rank: plans[rank][step]."""
    return [plan_epoch(n, r, world, batch, seed, epoch, accumulation=acc, start=start, shuffle=shuffle)
            for r in range(world)]


def ids_of_step(plans, s):
    """Ids of step ``s`` over all ranks and micro-batches, in rank-then-micro-batch order."""
    return np.concatenate([m for plan in plans for m in plan[s].micro_batches])


def all_ids(plans):
    return np.concatenate([m for plan in plans for step in plan for m in step.micro_batches])


def epoch_order(plans):
    """Ids in the order of the global permutation: step, then micro-batch, then rank."""
    out = []
    for s in range(len(plans[0])):
        for j in range(len(plans[0][s].micro_batches)):
            out.extend(plan[s].micro_batches[j] for plan in plans)
    return np.concatenate(out) if out else np.array([], dtype=np.int64)


def check_same_step_count(plans, n, world, batch, acc, start=0):
    counts = {len(plan) for plan in plans}
    assert counts == {steps_per_epoch(n, world, batch, acc, start)}


def check_exactly_once(plans, n):
    ids = all_ids(plans)
    assert len(ids) == n
    assert sorted(ids.tolist()) == list(range(n))


def check_matches_one_rank(plans, n, world, batch, acc, seed, epoch):
    """World w with batch b trains, step for step and micro-batch for micro-batch, what 1 rank with batch w*b does."""
    single = plan_epoch(n, 0, 1, batch * world, seed, epoch, accumulation=acc)
    assert len(single) == len(plans[0])
    for s, ref in enumerate(single):
        assert sorted(ids_of_step(plans, s).tolist()) == sorted(np.concatenate(ref.micro_batches).tolist())
        for j, ref_micro in enumerate(ref.micro_batches):
            mine = np.concatenate([plan[s].micro_batches[j] for plan in plans])
            assert sorted(mine.tolist()) == sorted(ref_micro.tolist())
        for plan in plans:
            assert plan[s].samples_in_step == ref.samples_in_step
            assert plan[s].end == ref.end


def check_weights(plans, world, rng):
    """Horovod averages over ranks: sum_r sum_j w_rj * mean_loss_rj / world must be the step's exact mean."""
    losses = rng.random(1 + max(int(all_ids(plans).max()), 0))
    for s in range(len(plans[0])):
        total = plans[0][s].samples_in_step
        step_ids = ids_of_step(plans, s)
        assert total == len(step_ids)
        averaged = 0.0
        for plan in plans:
            step = plan[s]
            assert len(step.weights) == len(step.micro_batches)
            for ids, w in zip(step.micro_batches, step.weights):
                assert w == pytest.approx(len(ids) * world / total)
                if len(ids):
                    averaged += w * losses[ids].mean() / world
                else:
                    assert w == 0  # an empty rank contributes a zero gradient
        assert averaged == pytest.approx(losses[step_ids].mean(), rel=1e-12, abs=1e-12)


def check_all(n, world, batch, acc, seed=0, epoch=0, rng=None):
    rng = rng or np.random.default_rng(0)
    plans = all_plans(n, world, batch, acc, seed, epoch)
    check_same_step_count(plans, n, world, batch, acc)
    check_exactly_once(plans, n)
    check_matches_one_rank(plans, n, world, batch, acc, seed, epoch)
    check_weights(plans, world, rng)
    for plan in plans:
        assert all(len(step.micro_batches) == acc for step in plan)
    assert [step.end for step in plans[0]][-1] == n


# ---------------------------------------------------------------- plan_epoch invariants

NAMED_CASES = {
    "divisible": (16, 2, 4, 1),
    "remainder": (10, 2, 4, 1),
    "remainder_world3": (11, 3, 2, 1),
    "n_below_world_times_batch": (5, 4, 8, 1),
    "n_equals_world": (4, 4, 1, 1),
    "n_equals_world_big_batch": (3, 3, 16, 1),
    "single_rank": (7, 1, 3, 1),
    "single_sample": (1, 1, 1, 1),
    "accumulation2": (23, 2, 3, 2),
    "accumulation3": (50, 4, 2, 3),
    "accumulation3_tiny": (4, 4, 1, 3),
    "accumulation_short_last_micro": (13, 2, 2, 3),
    "accumulation_more_than_data": (6, 3, 4, 3),
}


@pytest.mark.parametrize("case", sorted(NAMED_CASES))
def test_plan_invariants_named_cases(case):
    n, world, batch, acc = NAMED_CASES[case]
    check_all(n, world, batch, acc)


def test_plan_invariants_full_grid():
    for world in range(1, 5):
        for acc in range(1, 4):
            for batch in (1, 2, 3, 5):
                for n in sorted({world, world + 1, world * batch - 1, world * batch, world * batch + 1,
                                 world * batch * acc + 3, 37}):
                    if n >= world:
                        check_all(n, world, batch, acc, seed=world + acc, epoch=batch)


def test_plan_invariants_random_sweep():
    pick = random.Random(20240601)
    rng = np.random.default_rng(7)
    for _ in range(200):
        world = pick.randint(1, 4)
        n = pick.randint(world, 120)
        batch = pick.randint(1, 9)
        acc = pick.randint(1, 3)
        seed, epoch = pick.randint(0, 10**6), pick.randint(0, 50)
        check_all(n, world, batch, acc, seed, epoch, rng)


def test_docstring_example():
    plan = plan_epoch(10, rank=1, world_size=2, batch_size=2, seed=0, epoch=0)
    assert (len(plan), sum(len(m) for s in plan for m in s.micro_batches)) == (3, 5)


def test_plan_follows_the_epoch_permutation():
    n, world, batch, acc = 29, 3, 2, 2
    plans = all_plans(n, world, batch, acc, seed=5, epoch=2)
    assert epoch_order(plans).tolist() == epoch_permutation(n, 5, 2).tolist()


def test_remainder_step_has_ranks_with_fewer_or_no_samples():
    plans = all_plans(5, 4, 8, 1)  # one step of 5 samples on 4 ranks
    assert [len(plan) for plan in plans] == [1, 1, 1, 1]
    assert [len(plan[0].micro_batches[0]) for plan in plans] == [2, 1, 1, 1]
    plans = all_plans(6, 3, 4, 3)  # micro-batches 2 and 3 of the only step are empty everywhere
    for plan in plans:
        assert [len(m) for m in plan[0].micro_batches] == [2, 0, 0]
        assert plan[0].weights == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------- order

def test_order_is_deterministic_for_same_seed_and_epoch():
    a = all_plans(40, 2, 3, 2, seed=11, epoch=4)
    b = all_plans(40, 2, 3, 2, seed=11, epoch=4)
    assert epoch_order(a).tolist() == epoch_order(b).tolist()
    assert epoch_permutation(40, 11, 4).tolist() == epoch_permutation(40, 11, 4).tolist()


def test_order_differs_between_epochs_and_seeds():
    base = epoch_order(all_plans(40, 2, 3, seed=1, epoch=0)).tolist()
    assert epoch_order(all_plans(40, 2, 3, seed=1, epoch=1)).tolist() != base
    assert epoch_order(all_plans(40, 2, 3, seed=2, epoch=0)).tolist() != base
    perms = {tuple(epoch_permutation(40, seed, epoch)) for seed in range(3) for epoch in range(3)}
    assert len(perms) == 9


def test_epoch_permutation_is_a_permutation():
    for n in (0, 1, 2, 17, 100):
        perm = epoch_permutation(n, 3, 9)
        assert perm.dtype == np.int64
        assert sorted(perm.tolist()) == list(range(n))


def test_no_shuffle_gives_natural_order():
    for world, batch, acc in [(1, 4, 1), (2, 3, 1), (3, 2, 2), (4, 1, 3)]:
        plans = all_plans(23, world, batch, acc, seed=9, epoch=3, shuffle=False)
        assert epoch_order(plans).tolist() == list(range(23))
    assert epoch_permutation(7, 1, 1, shuffle=False).tolist() == list(range(7))


# ---------------------------------------------------------------- resume across a resize

def check_resume(n, old_world, new_world, batch, acc, new_batch, new_acc, seed=3, epoch=1):
    old = all_plans(n, old_world, batch, acc, seed, epoch)
    ends = [step.end for step in old[0]]
    for k, end in enumerate([0] + ends):
        done = set(np.concatenate([m for plan in old for step in plan[:k] for m in step.micro_batches]
                                  + [np.array([], dtype=np.int64)]).tolist())
        assert len(done) == end
        new = all_plans(n, new_world, new_batch, new_acc, seed, epoch, start=end)
        check_same_step_count(new, n, new_world, new_batch, new_acc, start=end)
        rest = all_ids(new).tolist() if new[0] else []
        assert len(rest) == len(set(rest)) == n - end
        assert set(rest) == set(range(n)) - done
        if new[0]:
            assert new[0][-1].end == n


def test_resume_on_more_workers_is_exactly_once():
    check_resume(37, old_world=2, new_world=4, batch=3, acc=1, new_batch=3, new_acc=1)


def test_resume_on_fewer_workers_is_exactly_once():
    check_resume(37, old_world=4, new_world=3, batch=2, acc=2, new_batch=2, new_acc=1)


def test_resume_with_other_batch_and_accumulation_is_exactly_once():
    check_resume(50, old_world=3, new_world=1, batch=4, acc=3, new_batch=5, new_acc=2)
    check_resume(9, old_world=2, new_world=3, batch=1, acc=1, new_batch=4, new_acc=3)


def test_resume_at_end_of_epoch_is_empty_and_out_of_range_raises():
    assert all_plans(10, 2, 2, start=10) == [[], []]
    assert steps_per_epoch(10, 2, 2, start=10) == 0
    for start in (-1, 11):
        with pytest.raises(HvdkitError, match="resume position"):
            plan_epoch(10, 0, 2, 2, seed=0, epoch=0, start=start)


# ---------------------------------------------------------------- eval_indices

def test_eval_indices_partition_range():
    for n in range(0, 14):
        for world in range(1, 6):
            parts = [eval_indices(n, r, world) for r in range(world)]
            assert np.concatenate(parts).tolist() == list(range(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_eval_indices_fewer_samples_than_workers_and_empty():
    assert [eval_indices(2, r, 4).tolist() for r in range(4)] == [[0], [1], [], []]
    assert all(len(eval_indices(0, r, 3)) == 0 for r in range(3))


# ---------------------------------------------------------------- shard_files

FILES = [f"part-{i:03d}.tfrecord" for i in range(7)]


def shards(files, world, **kw):
    return [shard_files(files, r, world, **kw) for r in range(world)]


def test_shard_files_gives_whole_files_covering_the_list():
    for world in range(1, len(FILES) + 1):
        for shuffle in (False, True):
            parts = shards(FILES, world, seed=1, epoch=2, shuffle=shuffle)
            flat = [f for part in parts for f in part]
            assert sorted(flat) == sorted(FILES)  # each file exactly once, and whole
            assert all(part for part in parts)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_shard_files_without_shuffle_is_round_robin():
    assert shards(FILES, 3) == [FILES[0::3], FILES[1::3], FILES[2::3]]


def test_shard_files_shuffle_varies_with_epoch_and_is_deterministic():
    files = [f"f{i}" for i in range(20)]
    by_epoch = [shards(files, 2, seed=4, epoch=e, shuffle=True) for e in range(3)]
    assert by_epoch[0] != by_epoch[1] and by_epoch[1] != by_epoch[2]
    assert shards(files, 2, seed=4, epoch=1, shuffle=True) == by_epoch[1]


def test_shard_files_errors():
    with pytest.raises(HvdkitError, match="empty"):
        shard_files([], 0, 1)
    with pytest.raises(HvdkitError, match="at least 4 files"):
        shard_files(["a", "b", "c"], 0, 4)


# ---------------------------------------------------------------- check_train_config

def test_check_train_config_accepts_valid_input():
    check_train_config(1, 1, 1)
    check_train_config(4, 4, 1, accumulation=3)


@pytest.mark.parametrize("batch_size", [0, -1, None])
def test_check_train_config_rejects_bad_batch_size(batch_size):
    with pytest.raises(HvdkitError, match="--batch-size"):
        check_train_config(10, 2, batch_size)


def test_check_train_config_rejects_bad_accumulation():
    with pytest.raises(HvdkitError, match="accumulation must be >= 1"):
        check_train_config(10, 2, 4, accumulation=0)


def test_check_train_config_rejects_empty_dataset():
    with pytest.raises(HvdkitError, match="empty.*check the data path"):
        check_train_config(0, 2, 4)


def test_check_train_config_rejects_fewer_samples_than_workers():
    with pytest.raises(HvdkitError, match="use at most 3 workers"):
        check_train_config(3, 4, 4)


def test_plan_epoch_checks_config_first():
    with pytest.raises(HvdkitError, match="--batch-size"):
        plan_epoch(10, 0, 2, 0, seed=0, epoch=0)
    with pytest.raises(HvdkitError, match="use at most 1 workers"):
        plan_epoch(1, 0, 2, 4, seed=0, epoch=0)


# ---- stream_plan: tf.data shards and whole files -----------------------------------------------------------


@pytest.mark.parametrize("sizes, batch", [([5, 4], 4), ([3, 3, 2], 4), ([9, 1], 4), ([23, 27], 4), ([1, 1, 1, 1], 2),
                                          ([100, 3, 50], 7)])
def test_stream_plan_equal_steps_exact_weights_and_resume(sizes, batch):
    world = len(sizes)
    plans = [stream_plan(sizes, r, batch) for r in range(world)]
    steps = -(-max(sizes) // batch)
    assert all(len(p) == steps for p in plans)
    for r, plan in enumerate(plans):
        assert sum(len(s.micro_batches[0]) for s in plan) == sizes[r]  # every example of the shard, once
    for s in range(steps):
        here = [len(p[s].micro_batches[0]) for p in plans]
        total = plans[0][s].samples_in_step
        assert sum(here) == total and all(p[s].samples_in_step == total for p in plans)
        # weighted mean over ranks == the mean over every sample of the step
        assert sum(p[s].weights[0] for p in plans) / world == pytest.approx(1.0)
        assert [p[s].weights[0] for p in plans] == pytest.approx([h * world / total for h in here])
    assert plans[0][-1].end == sum(sizes)
    # resuming at any step boundary gives the remaining steps, identically
    for s in range(1, steps):
        start = plans[0][s - 1].end
        for r in range(world):
            assert [x.end for x in stream_plan(sizes, r, batch, start)] == [x.end for x in plans[r][s:]]


def test_stream_plan_errors():
    with pytest.raises(HvdkitError, match="no data at all"):
        stream_plan([5, 0], 0, 4)
    with pytest.raises(HvdkitError, match="batch_size"):
        stream_plan([5, 5], 0, 0)
    with pytest.raises(HvdkitError, match="step boundary"):
        stream_plan([5, 4], 0, 4, start=3)


def test_even_sizes_matches_tf_data_shard():
    for n in range(0, 30):
        for world in range(1, 5):
            sizes = even_sizes(n, world)
            assert sizes == [len(range(r, n, world)) for r in range(world)]


# ---- stream_segments: a stream's epoch split over several world sizes ---------------------------------------


@pytest.mark.parametrize("sizes, batch", [([5, 4], 4), ([3, 3, 2], 4), ([23, 27], 4), ([100, 3, 50], 7)])
def test_stream_consumed_matches_the_plan_at_every_boundary(sizes, batch):
    plans = [stream_plan(sizes, r, batch) for r in range(len(sizes))]
    assert stream_consumed(sizes, batch, 0) == [0] * len(sizes)
    for s, step in enumerate(plans[0], start=1):
        read = [sum(len(x.micro_batches[0]) for x in plan[:s]) for plan in plans]
        assert stream_consumed(sizes, batch, step.end) == read
    between = min(set(range(1, sum(sizes))) - {step.end for step in plans[0]})
    with pytest.raises(HvdkitError, match="step boundary"):
        stream_consumed(sizes, batch, between)
    with pytest.raises(HvdkitError, match="step boundary"):
        stream_consumed(sizes, batch, sum(sizes) + 1)     # more than there is: not an endless loop


def test_stream_segments_split_what_is_left():
    segments = stream_segments([25, 25], [[2, 0], [3, 16], [1, 40]], batch_size=4)
    assert [(s.world_size, s.start) for s in segments] == [(2, 0), (3, 16), (1, 40)]
    assert segments[0].consumed == [8, 8] and segments[1].sizes == [12, 11, 11]
    assert segments[1].consumed == [8, 8, 8] and segments[2].sizes == [10] and segments[2].consumed is None
    # each segment's plan counts positions from the epoch's start and ends where the next one begins
    plan = stream_plan(segments[1].sizes, 0, 4, start=16, offset=16)
    assert plan[0].end == 28 and plan[1].end == 40 and plan[-1].end == 50


def test_a_remainder_smaller_than_the_world_leaves_ranks_empty_but_in_step():
    segments = stream_segments([25, 25], [[2, 0], [4, 48]], batch_size=4)
    assert segments[-1].sizes == [1, 1, 0, 0]
    plans = [stream_plan(segments[-1].sizes, r, 4, start=48, offset=48) for r in range(4)]
    assert [len(p) for p in plans] == [1, 1, 1, 1]                      # everyone joins the one step
    assert [p[0].weights[0] for p in plans] == [2.0, 2.0, 0.0, 0.0] and plans[0][0].end == 50


def test_stream_segments_reject_layouts_that_do_not_fit():
    with pytest.raises(HvdkitError, match="start at sample 0"):
        stream_segments([5, 5], [[2, 3]], 2)
    with pytest.raises(HvdkitError, match="2 shards"):
        stream_segments([5, 5], [[3, 0]], 2)
    with pytest.raises(HvdkitError, match="step boundary"):
        stream_segments([5, 5], [[2, 0], [3, 3]], 2)


def test_resume_layout_records_each_world_size_of_the_epoch():
    from hvdkit.resume import next_layout, resumed_progress

    def layout(previous, position):
        return next_layout(previous, position, world_size=3)
    assert layout([[2, 0]], 0) == [[3, 0]]                         # a new epoch starts afresh
    assert layout([], 40) == [[3, 0]]                              # nothing recorded (older commit)
    assert layout([[2, 0]], 16) == [[2, 0], [3, 16]]               # resized mid-epoch
    assert layout([[2, 0], [3, 16]], 28) == [[2, 0], [3, 16]]      # rollback, same workers
    assert layout([[2, 0], [1, 16]], 16) == [[2, 0], [3, 16]]      # that stretch trained nothing
    previous = [[2, 0]]
    assert layout(previous, 16) is not previous and previous == [[2, 0]]  # commits keep their own copy
    # a checkpoint from before layouts were recorded: its epoch began on the world that wrote it
    def resumed(**saved):
        return resumed_progress(dict({"epoch": 0, "position": 8, "global_step": 4}, **saved))["layout"]
    assert resumed(layout=[], saved_world_size=2) == [[2, 0]]
    assert layout(resumed(saved_world_size=2), 8) == [[2, 0], [3, 8]]
    assert resumed(layout=[[2, 0], [1, 4]], saved_world_size=1) == [[2, 0], [1, 4]]
