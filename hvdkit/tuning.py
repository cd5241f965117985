"""Horovod settings hvdkit uses by default on CPU hosts; each one is a measurement (README "Tuned defaults").

The adapters apply them with ``os.environ.setdefault`` before ``hvd.init()``, so a variable the user
sets always wins.

Example::

    apply_defaults()          # before hvd.init()
"""
import os

HOROVOD_DEFAULTS = {
    # 1 ms (Horovod's default) wakes the background thread too often on a 2-core host: it competes with
    # the compute thread. 5 ms measured fastest for the small CNN (platform notes; bench train).
    "HOROVOD_CYCLE_TIME": "5",
}


def apply_defaults(environ=os.environ) -> None:
    for key, value in HOROVOD_DEFAULTS.items():
        environ.setdefault(key, value)
