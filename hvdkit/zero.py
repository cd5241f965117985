"""Shard arithmetic for a sharded optimizer (ZeRO stages 1-2): framework-free, plain integers.

The tensors of one param group are laid end to end in one flat vector (each flattened, in the group's order),
zero-padded to a multiple of the world size and cut into ``world`` equal contiguous shards; rank ``r`` owns shard
``r``. Balance is by elements, not by whole tensors: every rank holds exactly ``ceil(total / world)`` elements, a
tensor may be split over two or more shards, and only the last shards end in padding (at most ``world - 1``
padding elements in all), so per-rank memory is equal to within one element per group. An even split is also what
a reduce-scatter of the padded vector hands each rank.

Example::

    >>> layout = FlatLayout([3, 5, 2], world=3)         # 10 elements -> padded to 12, shards of 4
    >>> layout.padded, layout.shard_size, layout.shard_range(2)
    (12, 4, (8, 12))
    >>> [(p.index, p.start, p.stop, p.offset) for p in layout.pieces(1)]   # tensor 1's elements 1..4
    [(1, 1, 5, 0)]
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

from .errors import HvdkitError


def padded_length(total: int, world: int) -> int:
    """``total`` rounded up to a multiple of ``world``, at least ``world`` (every rank owns one element or more,
    so an empty group still has a shard per rank and the collectives line up).

    Example::

        >>> padded_length(10, 3), padded_length(0, 2)
        (12, 2)
    """
    if world < 1 or total < 0:
        raise HvdkitError(f"a flat layout needs world >= 1 and total >= 0 (got world {world}, total {total})")
    return max(-(-total // world), 1) * world


@dataclasses.dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of tensor ``index`` (flattened) lie in a shard from position ``offset`` on."""
    index: int
    start: int
    stop: int
    offset: int

    @property
    def length(self) -> int:
        return self.stop - self.start


class FlatLayout:
    """Tensors of ``sizes`` elements, flattened end to end, padded and cut into ``world`` equal shards.

    Example::

        >>> layout = FlatLayout([7], world=2)           # one tensor larger than a shard: split over both ranks
        >>> [(p.start, p.stop) for r in range(2) for p in layout.pieces(r)]
        [(0, 4), (4, 7)]
    """

    def __init__(self, sizes: Sequence[int], world: int):
        self.sizes = [int(s) for s in sizes]
        if any(s < 0 for s in self.sizes):
            raise HvdkitError(f"tensor sizes must be >= 0 (got {self.sizes})")
        self.world = int(world)
        self.total = sum(self.sizes)
        self.padded = padded_length(self.total, self.world)
        self.shard_size = self.padded // self.world
        self.offsets: List[int] = []      # where each tensor starts in the flat vector
        at = 0
        for size in self.sizes:
            self.offsets.append(at)
            at += size

    def shard_range(self, rank: int) -> Tuple[int, int]:
        """``[start, stop)`` of rank ``rank``'s shard in the padded flat vector."""
        if not 0 <= rank < self.world:
            raise HvdkitError(f"rank {rank} is outside a world of {self.world}")
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def pieces(self, rank: int) -> List[Piece]:
        """The parts of tensors inside rank ``rank``'s shard, in order (padding is in none of them)."""
        low, high = self.shard_range(rank)
        found = []
        for index, (begin, size) in enumerate(zip(self.offsets, self.sizes)):
            start, stop = max(low, begin), min(high, begin + size)
            if start < stop:
                found.append(Piece(index, start - begin, stop - begin, start - low))
        return found

    def owners(self, index: int) -> List[int]:
        """The ranks whose shards hold part of tensor ``index``."""
        begin, size = self.offsets[index], self.sizes[index]
        if size == 0:
            return []
        return list(range(begin // self.shard_size, (begin + size - 1) // self.shard_size + 1))

    def __repr__(self) -> str:
        return f"FlatLayout({len(self.sizes)} tensors, {self.total} elements, world {self.world}, shard {self.shard_size})"
