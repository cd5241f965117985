"""tf.data inputs that do not fit the job, in one process: more workers than files, and a wrong example count.

More workers than files (an elastic job grew past them) is handled: whole-file sharding gives way to every rank
reading all files and keeping every world-th example, with the same exactly-once epochs; every rank of every
world size 1..4 is simulated here, through mid-epoch resizes too. A wrong ``n`` (or ``TFFiles`` counts) keeps
every rank on the planned number of steps, and the end of the epoch stops training with one error naming
both counts; the trainer-level tests run at world size 1 (``LocalProcess``).
"""
import inspect
import json
import logging
import textwrap

import numpy as np
import pytest

import hvdkit.loop
from proc import explain, launch
from hvdkit import TrainConfig, Trainer
from hvdkit.errors import HvdkitError
from hvdkit.log import get_logger
from hvdkit.resume import next_layout
from hvdkit.sharding import stream_plan

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402
from hvdkit.keras import KerasAdapter, KerasFitAdapter, LocalProcess, TFFiles, TFStream  # noqa: E402
from hvdkit.keras.feed import StreamFeed  # noqa: E402

# The verdict on a wrong count is summed over ranks in the epoch loop's end-of-epoch allreduce.
needs_tally = pytest.mark.skipif("epoch_tally" not in inspect.getsource(hvdkit.loop),
                                 reason="hvdkit/loop.py does not sum the stream's epoch_tally yet")

BATCH = 4
CFG = TrainConfig(batch_size=BATCH, seed=7)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def write_files(directory, counts):
    """TFRecord files of examples whose feature x[0] is the example id; returns the paths."""
    paths, start = [], 0
    for i, count in enumerate(counts):
        path = str(directory / f"part-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for j in range(start, start + count):
                w.write(tf.train.Example(features=tf.train.Features(feature={
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=[j, 1.0, -1.0])),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[j % 3]))})).SerializeToString())
        paths.append(path)
        start += count
    return paths


def parse(record):
    f = tf.io.parse_single_example(record, {"x": tf.io.FixedLenFeature([3], tf.float32),
                                            "y": tf.io.FixedLenFeature([], tf.int64)})
    return f["x"], f["y"]


def stream(count, n):
    x = np.arange(count, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return TFStream(tf.data.Dataset.from_tensor_slices((x, np.arange(count, dtype=np.int64) % 3)), n=n)


# ---- more workers than files ----------------------------------------------------------------------------------

# world sizes that read whole files; the others fall back (file 1 of [5, 0, 9] is empty: 2 workers would leave
# rank 1 with nothing)
WHOLE_FILES = {(7, 12): {1, 2}, (19,): {1}, (5, 0, 9): {1}}


@pytest.mark.parametrize("counts", sorted(WHOLE_FILES))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fewer_files_than_workers_still_split_every_example_once(tmp_path, counts, world):
    source = TFFiles(write_files(tmp_path, counts), parse=parse)
    whole_files = world in WHOLE_FILES[counts]
    assert source.by_file(world) == whole_files
    assert (source.layout_note(world) is None) == whole_files
    sizes = source.sizes(world)
    read = [[int(i) for i, _ in source.rank_dataset(r, world, seed=0, epoch=1, ids=True)] for r in range(world)]
    assert [len(ids) for ids in read] == sizes and min(sizes) > 0
    assert sorted(i for ids in read for i in ids) == list(range(sum(counts)))
    for rank, ids in enumerate(read):  # ids name the examples (x[0] carries the id)
        assert [int(x[0]) for x, _ in source.rank_dataset(rank, world, seed=0, epoch=1)] == ids
    plans = [stream_plan(sizes, r, BATCH) for r in range(world)]
    assert len({len(p) for p in plans}) == 1   # every rank the same number of steps


def feed_epoch(source, worlds_and_steps, epoch=0):
    """Example ids each rank's StreamFeed hands out, world size by world size; the last one runs to the end."""
    feeds, layout, position, read = {}, None, 0, []
    for i, (world, take) in enumerate(worlds_and_steps):
        layout = next_layout(layout, position, world)
        ends = []
        for rank in range(world):
            feed = feeds.setdefault((world, rank), StreamFeed(source))
            steps = feed.plan(epoch, position, CFG, rank, world, layout)
            take_here = len(steps) if i == len(worlds_and_steps) - 1 else take
            for _, (step, _) in zip(range(take_here), feed.step_batches(steps, rank, world)):
                read += step.micro_batches[0].tolist()   # the ids it names
            ends.append(steps[take_here - 1].end)
        assert len(set(ends)) == 1
        position = ends[0]
    return read


def test_an_elastic_job_growing_past_the_file_count_keeps_exactly_once(tmp_path):
    source = TFFiles(write_files(tmp_path, [17, 23]), parse=parse)   # 40 examples in 2 files
    for case in ([(1, 2), (4, 0)], [(2, 1), (4, 1), (3, 0)], [(4, 2), (1, 0)]):
        read = feed_epoch(source, case)
        assert sorted(read) == list(range(40)), case
    assert sorted(feed_epoch(source, [(4, 0)], epoch=1)) == list(range(40))   # the next epoch starts at 4


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((record.name, record.getMessage()))


def test_the_fallback_is_logged_once_on_rank_0(tmp_path):
    source = TFFiles(write_files(tmp_path, [7, 12]), parse=parse)
    feeds = [StreamFeed(source) for _ in range(3)]
    seen = Lines()
    loggers = [get_logger(rank) for rank in range(3)]   # hvdkit's rank loggers do not propagate to the root
    for logger in loggers:
        logger.addHandler(seen)
    try:
        for epoch in range(2):
            for rank, feed in enumerate(feeds):
                feed.plan(epoch, 0, CFG, rank, 3)
    finally:
        for logger in loggers:
            logger.removeHandler(seen)
    assert seen.lines == [("hvdkit.rank0", "2 files for 3 workers: whole files would leave some rank without data, so "
                      "every rank reads all files and keeps one example in 3 (3x the reading per rank; split the "
                      "data into at least 3 non-empty files to avoid it)")]


# ---- a wrong example count -------------------------------------------------------------------------------------

def rank_tallies(make_source, world, mode):
    """Every rank of ``world`` as a separate StreamFeed: steps fed (as Keras would pull them) and its tally."""
    tallies, fed = [], []
    for rank in range(world):
        feed = StreamFeed(make_source())
        steps = feed.plan(0, 0, CFG, rank, world)
        if mode == "loop":
            batches = [micro[0] for _, micro in feed.step_batches(steps, rank, world)]
            fed.append((len(steps), len(batches), [b.count for b in batches]))
        else:
            dataset, _ = feed.fit_input(steps, rank, world, 1)
            it = iter(dataset)
            batches = [next(it) for _ in steps]   # Keras pulls exactly len(steps) batches, never one more
            fed.append((len(steps), len(batches), [int(tf.shape(b[2])[0]) for b in batches]))
        tallies.append(feed.epoch_tally())
    return fed, np.sum(tallies, axis=0), feed


@pytest.mark.parametrize("mode", ["loop", "fit"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("true_count", [26, 29, 30, 31, 37])
def test_every_rank_runs_its_planned_steps_and_the_summed_tally_finds_a_wrong_n(world, mode, true_count):
    fed, (declared, found), feed = rank_tallies(lambda: stream(true_count, 30), world, mode)
    for planned, given, counts in fed:
        assert given == planned                                    # never a step more or less: no rank waits
        assert all(0 <= c <= BATCH for c in counts)
    assert declared == 30 and found == true_count
    if true_count == 30:
        feed.check_tally(declared, found)
        return
    with pytest.raises(HvdkitError) as e:
        feed.check_tally(declared, found)
    assert str(e.value) == (
        f"the tf.data pipeline holds {true_count} examples but TFStream was given n=30 "
        f"({'the examples past n were never trained' if true_count > 30 else 'the plan had steps for examples that do not exist'}); "
        f"pass its true count: TFStream(dataset, n={true_count})")


def test_a_right_n_gives_the_same_batches_as_the_plan():
    feed = StreamFeed(stream(30, 30))
    steps = feed.plan(0, 0, CFG, 1, 3)
    got = [(step.micro_batches[0].tolist(), micro[0].count) for step, micro in feed.step_batches(steps, 1, 3)]
    assert [c for _, c in got] == [len(s.micro_batches[0]) for s in steps]
    assert sorted(i for ids, _ in got for i in ids) == list(range(1, 30, 3))


def test_once_an_epoch_matched_the_next_ones_are_not_counted():
    feed = StreamFeed(stream(30, 30))
    tallies = []
    for epoch in range(3):
        steps = feed.plan(epoch, 0, CFG, 0, 2)
        list(feed.step_batches(steps, 0, 2))
        tallies.append(feed.epoch_tally())
    assert tallies == [(15, 15), (0, 0), (0, 0)]   # verified in epoch 1; later epochs use the plain batches


def fit(source, mode, **config):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(3)])
    if mode == "fit":
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
        adapter = KerasFitAdapter(model)
    else:
        adapter = KerasAdapter(model, keras.optimizers.SGD(0.05), LOSS)
    cfg = TrainConfig(**dict(dict(epochs=2, batch_size=BATCH, progress_bar=False, lr_scaling="none"), **config))
    return Trainer(adapter, cfg, process=LocalProcess()).fit(source)


@needs_tally
@pytest.mark.parametrize("mode", ["loop", "fit"])
@pytest.mark.parametrize("n", [28, 33])
def test_training_with_a_wrong_n_stops_after_the_first_epoch_naming_both_counts(mode, n):
    with pytest.raises(HvdkitError, match=rf"^the tf.data pipeline holds 30 examples but TFStream was given n={n} "
                                          rf".*; pass its true count: TFStream\(dataset, n=30\)$"):
        fit(stream(30, n), mode)


@needs_tally
@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_wrong_file_counts_are_named_with_the_fix(tmp_path, mode):
    source = TFFiles(write_files(tmp_path, [7, 12]), parse=parse, counts=[7, 10])
    with pytest.raises(HvdkitError) as e:
        fit(source, mode)
    assert str(e.value) == ("the files hold 19 records but TFFiles counts sum to n=17 (the examples past n were "
                            "never trained); fix counts= (one number per file) or omit it to have the files counted")


@needs_tally
@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_a_right_n_passes_also_when_stopped_and_resumed_mid_epoch(tmp_path, mode):
    stopped = fit(stream(30, 30), mode, checkpoint_dir=str(tmp_path), stop_after_steps=3)
    resumed = fit(stream(30, 30), mode, checkpoint_dir=str(tmp_path))
    assert stopped.stopped_early and resumed.global_step == 16 and resumed.train_samples_per_epoch == 30



# ---- one real launch: 2 workers, 1 file ----------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, sys
    import keras, numpy as np, tensorflow as tf
    from hvdkit import TrainConfig, Trainer
    from hvdkit.errors import HvdkitError
    from hvdkit.keras import KerasFitAdapter, TFFiles, TFStream

    path, out = sys.argv[1], sys.argv[2]

    def parse(record):
        f = tf.io.parse_single_example(record, {"x": tf.io.FixedLenFeature([3], tf.float32),
                                                "y": tf.io.FixedLenFeature([], tf.int64)})
        return f["x"], f["y"]

    def fit(source):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        cfg = TrainConfig(epochs=2, batch_size=4, progress_bar=False, lr_scaling="none")
        return Trainer(KerasFitAdapter(model), cfg).fit(source), model

    result, model = fit(TFFiles([path], parse=parse))
    record = {"steps": result.global_step, "samples": result.train_samples_per_epoch,
              "weights": float(sum(np.abs(v.numpy()).sum() for v in model.variables))}
    try:  # last: a failed run may shut Horovod down on this rank
        x = np.zeros((30, 3), np.float32)
        fit(TFStream(tf.data.Dataset.from_tensor_slices((x, np.zeros(30, np.int64))), n=27))
        record["wrong_n"] = None
    except HvdkitError as e:
        record["wrong_n"] = str(e)
    with open(f"{out}/rank{result.rank}.json", "w") as f:
        json.dump(record, f)
""")


def test_two_workers_on_one_file_train_every_example_once_per_epoch(tmp_path):
    path = write_files(tmp_path, [19])[0]
    script = tmp_path / "one_file.py"
    script.write_text(WORKER)
    result = launch(str(script), [path, str(tmp_path)], np=2, timeout=300)
    assert result.returncode == 0, explain(result)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:   # 19 examples, 2 x 4 per step: 3 steps an epoch on both ranks, every example trained
        assert r["steps"] == 6 and r["samples"] == 19 and r["weights"] == ranks[0]["weights"]
    output = result.stdout + result.stderr
    assert output.count("1 file for 2 workers: whole files would leave some rank without data") == 1
    if "epoch_tally" in inspect.getsource(hvdkit.loop):   # the wrong n: the same verdict on both ranks
        for r in ranks:
            assert "the tf.data pipeline holds 30 examples but TFStream was given n=27" in r["wrong_n"]
