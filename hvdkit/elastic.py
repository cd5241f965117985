"""Horovod elastic state for the trainer: what a commit saves, a failure restores, a resize syncs.

Built on Horovod's own ``horovod.common.elastic.State`` (so its host-update notifications and
retry loop work unchanged), with hvdkit's content: the adapter's model and optimizer bytes, the
progress dict (epoch, position in samples, global step, the epoch's world-size layout), and optionally a
durable copy on rank 0; a rollback is marked in the audit log. Imported only in elastic mode.

Example (what :class:`hvdkit.Trainer` does when started by ``horovodrun --host-discovery-script``)::

    state = TrainerState(trainer, progress, store, audit, durable_every=1)
    adapter.elastic_run(body)(state)      # body calls state.commit() every N steps
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

from horovod.common.elastic import State

from .audit import AuditLog
from .checkpoint import CheckpointStore


class TrainerState(State):
    """Commit = snapshot in memory (+ every ``durable_every``-th commit on disk)."""

    def __init__(self, trainer, progress: Dict[str, Any], store: Optional[CheckpointStore],
                 audit: Optional[AuditLog], durable_every: int = 1):
        adapter = trainer.adapter
        super().__init__(bcast_object=adapter.broadcast_object, get_rank=lambda: adapter.rank)
        self.trainer, self.adapter, self.progress = trainer, adapter, progress
        self.store, self.audit, self.durable_every = store, audit, durable_every
        self.commits = 0
        self.restored = False
        self._snapshot()

    def _snapshot(self) -> None:
        self.committed = (self.adapter.state_to_bytes(self.progress), copy.deepcopy(self.progress))

    def save(self) -> None:
        self._snapshot()
        self.commits += 1
        if self.store is not None and self.adapter.rank == 0 and self.commits % self.durable_every == 0:
            self.trainer.save_checkpoint(self.store, self.progress, blob=self.committed[0])

    def restore(self) -> None:
        blob, progress = self.committed
        self.adapter.state_from_bytes(blob)
        self.progress.clear()
        self.progress.update(copy.deepcopy(progress))
        if self.audit:
            self.audit.rolled_back(progress["global_step"])
        self.restored = True

    def sync(self) -> None:
        self.adapter.broadcast_state()
        self.progress.update(self.adapter.broadcast_object(dict(self.progress)))
        self._snapshot()
