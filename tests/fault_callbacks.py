"""Callbacks the in-process trainer tests share to raise Horovod's exceptions where a lost peer would surface.

Example::

    fit(callbacks=[RaiseOnce(at=3, error=HorovodInternalError("peer lost"))], elastic=True)
"""
from hvdkit.callbacks import Callback


class RaiseOnce(Callback):
    """Raise ``error`` after global step ``at``, the first time only (a lost peer, a host change, a user's bug)."""
    all_ranks = True

    def __init__(self, at, error):
        self.at, self.error, self.fired = at, error, False

    def on_step_end(self, trainer, global_step, loss):
        if global_step == self.at and not self.fired:
            self.fired = True
            raise self.error
