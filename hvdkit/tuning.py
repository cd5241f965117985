"""Horovod settings hvdkit uses by default on CPU hosts; each one is a measurement (README "Tuned defaults").

The adapters apply them with ``os.environ.setdefault`` before ``hvd.init()``, so a variable the user
sets always wins.

Example::

    apply_defaults()          # before hvd.init()
"""
import os

HOROVOD_DEFAULTS = {
    # Horovod's background thread wakes every cycle; on a 2-core host it competes with the compute thread.
    # Sweep of the bench CNN, 2 workers, 4 interleaved runs each (median samples/s), torch / raw TF loop:
    # 1 ms (Horovod's default) 5596 / 7937, 2 ms 6783 / 12546, 5 ms 6022 / 8177. README "Tuned defaults".
    "HOROVOD_CYCLE_TIME": "2",
}


def apply_defaults(environ=os.environ) -> None:
    for key, value in HOROVOD_DEFAULTS.items():
        environ.setdefault(key, value)
