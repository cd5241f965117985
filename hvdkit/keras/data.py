"""tf.data inputs sharded by rank: a pipeline of examples, or a list of files read whole.

Sharding happens first, on single examples, before shuffling and batching, so each example
belongs to exactly one rank. Each epoch every rank reshuffles its shard from ``(seed, epoch)``,
runs the same number of steps (see ``hvdkit.sharding.stream_plan``) and trains every example
once. A stream cannot be permuted globally, so unlike in-memory arrays a rank keeps the same
examples from epoch to epoch; only their order changes. (The order also depends on TF's global
seed, which the adapters set from ``TrainConfig.seed``.)

Elastic resizes mid-epoch stay exactly-once: the trainer records the world size of each stretch
of the epoch, and :meth:`TFSource.segment_dataset` rebuilds what every old rank had left and deals
it out to the new ranks (see ``hvdkit.sharding.stream_segments``).

More workers than files (an elastic job that grew, or a static one started that way) is handled:
when whole files would leave some rank without data, :class:`TFFiles` falls back to reading every
file on every rank and keeping every ``world``-th example, as :class:`TFStream` does.

The declared count (``TFStream``'s ``n``, the sum of ``TFFiles``' ``counts``) is checked while the
epoch runs: ``hvdkit.keras.feed.StreamFeed`` counts what each rank's stream really holds, and a
wrong count ends training with an error naming both numbers (:meth:`TFSource.wrong_count`).

Example::

    source = TFFiles(sorted(glob.glob("data/*.tfrecord")), parse=parse_example)
    Trainer(KerasFitAdapter(model), TrainConfig(epochs=3)).fit(source, TFStream(test_ds, n=10000))
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence

import tensorflow as tf

from ..errors import HvdkitError
from ..sharding import Segment, even_sizes


def one_thread_options() -> tf.data.Options:
    """tf.data's own thread pool competes with the one compute thread per worker (measured 2x slower
    Keras fit at 2 workers on 2 cores); run input pipelines on one thread, without autotuning."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return options


def _shuffle_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2 ** 31 - 1)


class TFSource:
    """A tf.data input of ``n`` examples ``(x, y)``, split over ranks. Subclasses say how.

    Every example has an id, its place in the source (the stream's order; the files' order, then
    the records in each file), so audit records name samples, not positions.
    """

    shuffle_buffer = 10_000
    n: int

    def sizes(self, world_size: int) -> List[int]:
        raise NotImplementedError

    def layout_note(self, world_size: int) -> Optional[str]:
        """A line worth logging once about how this source is split over ``world_size`` ranks, or None."""
        return None

    def wrong_count(self, found: int) -> str:
        """The error when the input holds ``found`` examples but ``n`` says otherwise: both numbers and the fix."""
        return (f"the tf.data input holds {found} examples but n={self.n} was declared "
                f"({self._consequence(found)}); pass n={found}")

    def _consequence(self, found: int) -> str:
        return ("the examples past n were never trained" if found > self.n else
                "the plan had steps for examples that do not exist")

    def indexed_shard(self, rank: int, world_size: int) -> tf.data.Dataset:
        """This rank's examples as ``(id, (x, y))``, in source order."""
        raise NotImplementedError

    def shard(self, rank: int, world_size: int) -> tf.data.Dataset:
        return self.indexed_shard(rank, world_size).map(lambda i, xy: xy, num_parallel_calls=1)

    def rank_dataset(self, rank: int, world_size: int, seed: Optional[int] = None, epoch: int = 0,
                     ids: bool = False) -> tf.data.Dataset:
        """This rank's examples, unbatched; shuffled from (seed, epoch) unless ``seed`` is None.

        ids: yield ``(id, (x, y))`` instead of ``(x, y)``.
        """
        ds = self.indexed_shard(rank, world_size) if ids else self.shard(rank, world_size)
        if seed is not None:
            ds = ds.shuffle(self.shuffle_buffer, seed=_shuffle_seed(seed, epoch), reshuffle_each_iteration=False)
        return ds

    def segment_dataset(self, rank: int, seed: int, epoch: int, segments: Sequence[Segment]) -> tf.data.Dataset:
        """``(id, (x, y))`` for ``rank`` in the last of ``segments`` (``hvdkit.sharding.stream_segments``).

        Segment 0 is every rank's usual shuffled shard. For each later one, every old rank's shard
        is rebuilt (the shuffle is deterministic), what that rank had read is skipped, and the rest,
        concatenated, is dealt out element by element to the new ranks. So after a resize each new
        rank reads the whole remainder once to pick its share: the price of exactly-once on a stream,
        paid only for the rest of that epoch.
        """
        first = segments[0].world_size
        parts = [self.rank_dataset(r, first, seed, epoch, ids=True) for r in range(first)]
        for before, after in zip(segments, segments[1:]):
            rest = functools.reduce(lambda a, b: a.concatenate(b),
                                    [part.skip(used) for part, used in zip(parts, before.consumed)])
            parts = [rest.shard(after.world_size, r) for r in range(after.world_size)]
        return parts[rank]


class TFStream(TFSource):
    """Any tf.data pipeline of single examples with a known count; rank r takes examples i % world == r.

    Give the pipeline before ``shuffle`` and ``batch``: hvdkit shards, then shuffles and batches.
    The pipeline must yield the same examples in the same order every time it is iterated.
    """

    def __init__(self, dataset: tf.data.Dataset, n: int, shuffle_buffer: int = 10_000):
        if n is None or int(n) < 0:
            raise HvdkitError(f"TFStream needs the number of examples n (got {n}); count them once and pass it")
        self.dataset, self.n, self.shuffle_buffer = dataset, int(n), shuffle_buffer

    def sizes(self, world_size: int) -> List[int]:
        return even_sizes(self.n, world_size)

    def indexed_shard(self, rank: int, world_size: int) -> tf.data.Dataset:
        return self.dataset.enumerate().shard(world_size, rank)

    def wrong_count(self, found: int) -> str:
        return (f"the tf.data pipeline holds {found} examples but TFStream was given n={self.n} "
                f"({self._consequence(found)}); pass its true count: TFStream(dataset, n={found})")


class TFFiles(TFSource):
    """Whole files per rank (file i goes to rank i % world), read with ``reader`` and mapped by ``parse``.

    reader: called with one file name (a string tensor), returns that file's records.
    counts: examples per file; when omitted every rank counts them once by reading the files.

    When whole files would leave some rank with no example (fewer files than workers, say after an
    elastic job grew, or empty files), every rank reads all files instead and keeps every
    ``world``-th example: the same exactly-once epochs and step counts, at ``world`` times the
    reading per rank. ``StreamFeed`` logs it once on rank 0.

    Example::

        source = TFFiles(sorted(glob.glob("data/*.tfrecord")), parse=parse_example)
        source.by_file(4)   # False with 3 files: 4 workers read every file and split by example
    """

    def __init__(self, files: Sequence[str], parse: Optional[Callable] = None,
                 reader: Callable[[Any], tf.data.Dataset] = tf.data.TFRecordDataset,
                 counts: Optional[Sequence[int]] = None, shuffle_buffer: int = 10_000):
        self.files = list(files)
        if not self.files:
            raise HvdkitError("the file list is empty; check the glob or directory")
        self.parse, self.reader, self.shuffle_buffer = parse, reader, shuffle_buffer
        self.counted = counts is None
        if counts is None:
            counts = [sum(1 for _ in reader(f)) for f in self.files]
        if len(counts) != len(self.files):
            raise HvdkitError(f"{len(counts)} counts for {len(self.files)} files; give one count per file")
        self.counts = [int(c) for c in counts]
        self.n = sum(self.counts)
        self.first_ids = [sum(self.counts[:i]) for i in range(len(self.counts))]

    def by_file(self, world_size: int) -> bool:
        """Whether ``world_size`` ranks read whole files (else every file, keeping every world-th example).

        Decided from the counts alone, so every rank (and every rank simulated in a test) agrees.
        """
        return all(sum(self.counts[r::world_size]) > 0 for r in range(world_size))

    def layout_note(self, world_size: int) -> Optional[str]:
        if self.by_file(world_size):
            return None
        files = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        return (f"{files} for {world_size} workers: whole files would leave some rank without "
                f"data, so every rank reads all files and keeps one example in {world_size} ({world_size}x "
                f"the reading per rank; split the data into at least {world_size} non-empty files to avoid it)")

    def wrong_count(self, found: int) -> str:
        fix = ("the files changed after they were counted; rebuild TFFiles" if self.counted else
               "fix counts= (one number per file) or omit it to have the files counted")
        return (f"the files hold {found} records but TFFiles counts sum to n={self.n} "
                f"({self._consequence(found)}); {fix}")

    def sizes(self, world_size: int) -> List[int]:
        if not self.by_file(world_size):
            return even_sizes(self.n, world_size)
        return [sum(self.counts[i::world_size]) for i in range(world_size)]

    def indexed_shard(self, rank: int, world_size: int) -> tf.data.Dataset:
        if not self.by_file(world_size):  # every file, then example i to rank i % world (see sizes)
            return self._read(range(len(self.files))).shard(world_size, rank)
        return self._read(range(rank, len(self.files), world_size))

    def _read(self, which) -> tf.data.Dataset:
        """``(id, parsed record)`` of the files ``which``, in order; ids count from each file's first id."""
        which = list(which)

        def parse(record):  # as Dataset.map would call it: a tuple element is spread over the arguments
            if self.parse is None:
                return record
            return self.parse(*record) if isinstance(record, tuple) else self.parse(record)

        def read(path, first_id):
            return self.reader(path).enumerate().map(lambda i, record: (i + first_id, parse(record)),
                                                     num_parallel_calls=1)
        files = tf.data.Dataset.from_tensor_slices(([self.files[i] for i in which],
                                                    tf.constant([self.first_ids[i] for i in which], tf.int64)))
        return files.flat_map(read)
