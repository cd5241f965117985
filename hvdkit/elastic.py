"""Horovod elastic state: what a commit saves, a lost peer restores, a resize syncs.

Built on Horovod's own ``horovod.common.elastic.State`` (so its host-update notifications and retry
loop work unchanged). It is given what it needs as callables — the object collectives, the model's
bytes in and out, the model broadcast, the progress getter and setter, a durable save — and holds
copies, never a dict the trainer keeps mutating. Imported only in elastic mode.

Example (what :class:`hvdkit.Trainer` does when started by ``horovodrun --host-discovery-script``)::

    state = ElasticState(process, StateHooks(to_bytes=..., from_bytes=..., broadcast=...,
                                              get_progress=..., set_progress=..., durable=..., on_restore=...))
    process.elastic_run(body)(state)      # body calls state.commit() every N steps
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, Optional

from horovod.common.elastic import State
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

Progress = Dict[str, Any]


@dataclasses.dataclass
class StateHooks:
    """What the elastic state does with the model and the run, as callables."""
    to_bytes: Callable[[Progress], bytes]            # model + optimizer + progress as one blob
    from_bytes: Callable[[bytes], Progress]          # load such a blob into model + optimizer
    broadcast: Callable[[], None]                    # rank 0's model and optimizer everywhere
    get_progress: Callable[[], Progress]
    set_progress: Callable[[Progress], None]
    durable: Optional[Callable[[bytes, Progress], None]] = None   # write a commit to disk (rank 0)
    on_restore: Optional[Callable[[Progress], None]] = None        # after a rollback to ``progress``
    is_final: Optional[Callable[[Progress], bool]] = None          # the run's last commit: always durable
    # One rank's ordinary error (a bug, not a lost peer) must stop every rank, not be retried or left behind:
    exchange_failures: Optional[Callable[[], None]] = None  # first collective of a sync: raises if any rank failed
    on_error: Optional[Callable[[BaseException], None]] = None     # record this rank's error for that exchange
    is_peer_lost: Optional[Callable[[BaseException], bool]] = None
    gather: Optional[Callable[[], None]] = None   # every rank, before to_bytes (Adapter.gather_state)


class ElasticState(State):
    """Commit = snapshot in memory (+ every ``durable_every``-th commit, and the last one, through
    ``hooks.durable``)."""

    def __init__(self, process, hooks: StateHooks, durable_every: int = 1):
        super().__init__(bcast_object=process.broadcast_object, get_rank=lambda: process.rank)
        self.process, self.hooks, self.durable_every = process, hooks, durable_every
        self.commits = 0
        try:
            self._snapshot()
        except Exception as e:   # e.g. a model this rank failed to prepare: the first sync stops every rank
            if not self._recorded(e):
                raise
            self.committed = (None, copy.deepcopy(self.hooks.get_progress()))

    def _snapshot(self) -> None:
        progress = copy.deepcopy(self.hooks.get_progress())
        if self.hooks.gather is not None:
            self.hooks.gather()
        self.committed = (self.hooks.to_bytes(progress), progress)

    def save(self) -> None:
        self._snapshot()
        self.commits += 1
        final = self.hooks.is_final is not None and self.hooks.is_final(self.committed[1])
        if self.hooks.durable is not None and (self.commits % self.durable_every == 0 or final):
            self.hooks.durable(*self.committed)

    def restore(self) -> None:
        # Horovod calls this after a failed collective, then re-initialises and syncs: an error here is recorded
        # and stops every rank at that sync (raised from here, it would end this worker as if its host failed).
        try:
            blob, progress = self.committed
            if blob is not None:
                self.hooks.from_bytes(blob)
            self.hooks.set_progress(copy.deepcopy(progress))
            if self.hooks.on_restore is not None:
                self.hooks.on_restore(copy.deepcopy(progress))
        except Exception as e:
            if not self._recorded(e):
                raise

    def sync(self) -> None:
        if self.hooks.exchange_failures is not None:
            self.hooks.exchange_failures()   # before the broadcast: a rank that failed may not be able to join it
        try:
            self.hooks.broadcast()
            self.hooks.set_progress(self.process.broadcast_object(copy.deepcopy(self.hooks.get_progress())))
            self._snapshot()
        except HostsUpdatedInterrupt:
            raise
        except Exception as e:
            if not self._recorded(e):
                raise
            self.process.abort()   # the others' pending broadcast fails now; Horovod retries; the next sync stops
            raise HorovodInternalError(str(e)) from e

    def _recorded(self, error: BaseException) -> bool:
        """Record ``error`` for the next exchange when it is this rank's own (not a lost peer); False otherwise."""
        hooks = self.hooks
        if hooks.on_error is None or isinstance(error, HostsUpdatedInterrupt) or \
                (hooks.is_peer_lost is not None and hooks.is_peer_lost(error)):
            return False
        hooks.on_error(error)
        return True
