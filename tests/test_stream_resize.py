"""tf.data inputs through mid-epoch resizes, in one process: every rank of every world size simulated.

For a sequence of world sizes, each running some steps of the epoch, the ranks read their share of
each segment (``TFSource.segment_dataset``) batch by batch as ``stream_plan`` says; over the whole
epoch every example must be read exactly once, whatever the resizes. Multi-process elastic runs of
the same code are in test_elastic.py.
"""

import numpy as np
import pytest

from hvdkit.sharding import stream_plan, stream_segments

tf = pytest.importorskip("tensorflow")
from hvdkit.keras.data import TFFiles, TFStream  # noqa: E402

N, COUNTS, BATCH = 50, [7, 12, 9, 15, 7], 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    directory = tmp_path_factory.mktemp("files")
    x = np.arange(N, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)   # x[:, 0] is the example id
    y = np.arange(N, dtype=np.int64) % 3
    files, start = [], 0
    for i, count in enumerate(COUNTS):
        path = str(directory / f"part-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for j in range(start, start + count):
                w.write(tf.train.Example(features=tf.train.Features(feature={
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=x[j])),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[y[j]]))})).SerializeToString())
        files.append(path)
        start += count

    def parse(record):
        f = tf.io.parse_single_example(record, {"x": tf.io.FixedLenFeature([3], tf.float32),
                                                "y": tf.io.FixedLenFeature([], tf.int64)})
        return f["x"], f["y"]
    tf.random.set_seed(0)  # the adapters set TF's global seed; shuffles depend on it
    return {"stream": TFStream(tf.data.Dataset.from_tensor_slices((x, y)), n=N),
            "files": TFFiles(files, parse=parse)}


def run_epoch(source, worlds_and_steps, seed=0, epoch=0):
    """Ids read per (segment, rank); the last entry of ``worlds_and_steps`` runs to the epoch's end."""
    layout, position, read = [], 0, []
    for i, (world, steps) in enumerate(worlds_and_steps):
        layout.append([world, position])
        segments = stream_segments(source.sizes(layout[0][0]), layout, BATCH)
        last = segments[-1]
        plans = [stream_plan(last.sizes, r, BATCH, position, offset=last.start) for r in range(world)]
        take = len(plans[0]) if i == len(worlds_and_steps) - 1 else steps
        for rank, plan in enumerate(plans):
            batches = list(source.segment_dataset(rank, seed, epoch, segments).batch(BATCH).take(take))
            expected = [len(step.micro_batches[0]) for step in plan[:take]]
            got = [len(ids) for ids, _ in batches]
            assert got == [e for e in expected if e], (world, rank, got, expected)
            for ids, (x, _) in batches:
                assert np.array_equal(ids.numpy(), x.numpy()[:, 0].astype(np.int64))   # ids name the examples
                read += ids.numpy().tolist()
        position = plans[0][take - 1].end
    return read


CASES = {
    "no resize": [(2, 0)],
    "grow 2 to 3": [(2, 2), (3, 0)],
    "shrink 3 to 1": [(3, 1), (1, 0)],
    "grow 1 to 4, shrink to 2": [(1, 3), (4, 1), (2, 0)],
    "remainder smaller than the world": [(2, 6), (4, 0)],    # 48 of 50 done: two new ranks get nothing
    "grow then back": [(2, 1), (3, 1), (2, 1), (3, 0)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["stream", "files"])
def test_every_example_once_per_epoch_through_resizes(sources, kind, case):
    for epoch in (0, 3):
        read = run_epoch(sources[kind], CASES[case], seed=7, epoch=epoch)
        assert sorted(read) == list(range(N))


def test_a_rebuilt_shard_repeats_the_same_order(sources):
    stream = sources["stream"]
    first = [int(i) for i, _ in stream.rank_dataset(1, 2, 7, 2, ids=True)]
    again = [int(i) for i, _ in stream.rank_dataset(1, 2, 7, 2, ids=True)]
    other_epoch = [int(i) for i, _ in stream.rank_dataset(1, 2, 7, 3, ids=True)]
    assert first == again and sorted(first) == list(range(1, N, 2)) and first != other_epoch
