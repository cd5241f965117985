"""Worker of tests/test_zero_elastic.py: tests/workers/gated.py (its gates, HVDKIT_FAULT, ...) with every durable
commit kept (argv: SCRIPT [ARGS...]): ``keep_checkpoints`` is raised from 3, so the test can read the commits on
both sides of each resize after the job has ended.
"""
import dataclasses
import os
import runpy
import sys

WORKERS = os.path.dirname(os.path.abspath(__file__))
GATED = os.path.join(WORKERS, "gated.py")
KEEP = 10 ** 6


def keep_every_commit() -> None:
    import hvdkit.scripting as scripting
    original = scripting.config_from_args

    def config_from_args(args):
        return dataclasses.replace(original(args), keep_checkpoints=KEEP)
    scripting.config_from_args = config_from_args   # the example imports it from there after this


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: zero_elastic.py SCRIPT [ARGS...]")
    keep_every_commit()
    sys.argv = [GATED, *sys.argv[1:]]
    sys.path[0] = WORKERS
    runpy.run_path(GATED, run_name="__main__")
