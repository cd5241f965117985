"""tf.data inputs sharded by rank: a pipeline of examples, or a list of files read whole.

Sharding happens first, on single examples, before shuffling and batching, so each example
belongs to exactly one rank. Each epoch every rank reshuffles its shard from ``(seed, epoch)``,
runs the same number of steps (see ``hvdkit.sharding.stream_plan``) and trains every example
once. A stream cannot be permuted globally, so unlike in-memory arrays a rank keeps the same
examples from epoch to epoch; only their order changes. (The order also depends on TF's global
seed, which the adapters set from ``TrainConfig.seed``.)

Example::

    source = TFFiles(sorted(glob.glob("data/*.tfrecord")), parse=parse_example)
    Trainer(KerasFitAdapter(model), TrainConfig(epochs=3)).fit(source, TFStream(test_ds, n=10000))
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import tensorflow as tf

from ..errors import HvdkitError
from ..sharding import even_sizes, shard_files


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
    """A tf.data input of ``n`` examples ``(x, y)``, split over ranks. Subclasses say how."""

    shuffle_buffer = 10_000
    n: int

    def sizes(self, world_size: int) -> List[int]:
        raise NotImplementedError

    def shard(self, rank: int, world_size: int) -> tf.data.Dataset:
        raise NotImplementedError

    def rank_dataset(self, rank: int, world_size: int, seed: Optional[int] = None, epoch: int = 0) -> tf.data.Dataset:
        """This rank's examples, unbatched; shuffled from (seed, epoch) unless ``seed`` is None."""
        ds = self.shard(rank, world_size)
        if seed is not None:
            ds = ds.shuffle(self.shuffle_buffer, seed=_shuffle_seed(seed, epoch), reshuffle_each_iteration=False)
        return ds


class TFStream(TFSource):
    """Any tf.data pipeline of single examples with a known count; rank r takes examples i % world == r.

    Give the pipeline before ``shuffle`` and ``batch``: hvdkit shards, then shuffles and batches.
    """

    def __init__(self, dataset: tf.data.Dataset, n: int, shuffle_buffer: int = 10_000):
        if n is None or int(n) < 0:
            raise HvdkitError(f"TFStream needs the number of examples n (got {n}); count them once and pass it")
        self.dataset, self.n, self.shuffle_buffer = dataset, int(n), shuffle_buffer

    def sizes(self, world_size: int) -> List[int]:
        return even_sizes(self.n, world_size)

    def shard(self, rank: int, world_size: int) -> tf.data.Dataset:
        return self.dataset.shard(world_size, rank)


class TFFiles(TFSource):
    """Whole files per rank (file i goes to rank i % world), read with ``reader`` and mapped by ``parse``.

    counts: examples per file; when omitted every rank counts them once by reading the files.
    """

    def __init__(self, files: Sequence[str], parse: Optional[Callable] = None,
                 reader: Callable[[List[str]], tf.data.Dataset] = tf.data.TFRecordDataset,
                 counts: Optional[Sequence[int]] = None, shuffle_buffer: int = 10_000):
        self.files = list(files)
        if not self.files:
            raise HvdkitError("the file list is empty; check the glob or directory")
        self.parse, self.reader, self.shuffle_buffer = parse, reader, shuffle_buffer
        if counts is None:
            counts = [sum(1 for _ in reader([f])) for f in self.files]
        if len(counts) != len(self.files):
            raise HvdkitError(f"{len(counts)} counts for {len(self.files)} files; give one count per file")
        self.counts = [int(c) for c in counts]
        self.n = sum(self.counts)

    def sizes(self, world_size: int) -> List[int]:
        shard_files(self.files, 0, world_size)  # raises when some rank would get no file
        return [sum(self.counts[i::world_size]) for i in range(world_size)]

    def shard(self, rank: int, world_size: int) -> tf.data.Dataset:
        ds = self.reader(shard_files(self.files, rank, world_size))
        return ds.map(self.parse, num_parallel_calls=1) if self.parse else ds
