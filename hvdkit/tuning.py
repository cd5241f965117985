"""Horovod settings hvdkit uses by default on CPU hosts; each one is a measurement (README "Tuned defaults").

The adapters apply them with ``os.environ.setdefault`` before ``hvd.init()``, so a variable the user
sets always wins.

Example::

    apply_defaults()          # before hvd.init()
"""
import math
import os
import re

from .errors import HvdkitError

HOROVOD_DEFAULTS = {
    # Horovod's background thread wakes every cycle; on a 2-core host it competes with the compute thread.
    # Sweep of the bench CNN, 2 workers, 4 interleaved runs each (median samples/s), torch / raw TF loop:
    # 1 ms (Horovod's default) 5596 / 7937, 2 ms 6783 / 12546, 5 ms 6022 / 8177. README "Tuned defaults".
    "HOROVOD_CYCLE_TIME": "2",
    # Open MPI's progress engine polls: under mpirun (or horovodrun --controller mpi) the thread hvd.init() starts
    # held 44-69% of each rank's CPU time at 2 workers (DDP's threads < 10%), taken from the compute thread on a
    # 2-core host; yielding when idle cut that thread to 0.06-0.15 s per 40 steps and the steps from 4.6-5.0 s to
    # 2.0-2.4 s (raw Horovod loop, bench CNN, 3 alternating pairs). No effect under Gloo.
    "OMPI_MCA_mpi_yield_when_idle": "1",
    # With MPI ops Horovod copies every tensor of a fused allreduce into its fusion buffer and back; a tensor that
    # fills the threshold alone is reduced by itself, in place for torch (TF and Gloo still copy it once): memory
    # bandwidth is what a CPU host runs short of. Measured on one host; across a network re-measure (README).
    # Bench wide MLP (6.4 and 16.8 MB weight gradients), 2 workers, hvdkit torch against Horovod's 128 MiB, per
    # round: 4 MiB 1.12x (1.04-1.14), 1.06x (0.95-1.19), and 128 MiB 0.89x of it under horovodrun; 8 MiB 1.09x,
    # 1.06x; Keras loop 4 MiB 1.00x (TF copies a lone tensor into its output anyway). The CNN (0.8 MB of gradients
    # a step) fuses as before: 8 MiB 0.99x. Not in elastic jobs (apply_defaults). README "Tuned defaults",
    # docs/bench/fusion-*.md.
    "HOROVOD_FUSION_THRESHOLD": str(4 << 20),
}


def apply_defaults(environ=os.environ) -> None:
    """Set the defaults the user did not; a value the user set for one of them must make sense: Horovod reads
    ``HOROVOD_CYCLE_TIME=abc`` as 0 ms without a word and busy-loops, and ``HOROVOD_FUSION_THRESHOLD`` by its
    leading digits (``64MB``: a 64-byte threshold, in effect no fusion)."""
    for key, value in HOROVOD_DEFAULTS.items():
        given = environ.get(key)
        if key == "HOROVOD_CYCLE_TIME" and given is not None and not _positive_number(given):
            raise HvdkitError(f"{key} must be a number of milliseconds > 0 (got {given!r}); unset it "
                              f"(hvdkit uses {value}) or set e.g. {key}={value}")
        if key == "HOROVOD_FUSION_THRESHOLD" and given is not None and not re.fullmatch(r"\s*[0-9]+\s*", given):
            raise HvdkitError(f"{key} must be a whole number of bytes (got {given!r}); unset it (hvdkit uses "
                              f"{value}, {int(value) >> 20} MiB) or set e.g. {key}={64 << 20} for 64 MiB")
        if key == "HOROVOD_FUSION_THRESHOLD" and environ.get("HOROVOD_ELASTIC") == "1":
            # Horovod 0.28.1 with this variable set (to any value, its own 128 MiB too) segfaults rank 0 when an
            # elastic job grows (tests/test_elastic.py's resize): elastic jobs keep Horovod's built-in threshold
            continue
        environ.setdefault(key, value)


def threads_from_env(environ=os.environ) -> int:
    """``HVDKIT_THREADS`` (compute threads per worker, Keras; default 1) as a whole number >= 1, or one clear error."""
    given = environ.get("HVDKIT_THREADS", "1")
    if not (given.strip().isdigit() and int(given) >= 1):
        raise HvdkitError(f"HVDKIT_THREADS must be a whole number >= 1 (got {given!r}); unset it (1 compute thread "
                          "per worker) or set e.g. HVDKIT_THREADS=1")
    return int(given)


def _positive_number(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False
