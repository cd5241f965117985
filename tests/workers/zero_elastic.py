"""Worker of tests/test_zero_elastic.py: tests/workers/gated.py with two additions (argv: SCRIPT [ARGS...]).

* Every durable commit is kept (``keep_checkpoints`` raised from 3): the test reads the commits on both sides of
  each resize after the job has ended.
* A second gate, ``HVDKIT_GATE2_STEP=N``: when a step ends with ``global_step == N`` every worker writes
  ``reached2-<HOROVOD_HOSTNAME>-<pid>`` to HVDKIT_GATE_DIR and blocks until ``release2`` exists there (once per
  process, never once ``release2`` exists: after a rollback the step is reached again). gated.py's own gate
  (``HVDKIT_GATE_STEP``) holds the workers for one event; this one for a second event in the same job.

Everything else (the first gate, HVDKIT_FAULT, ...) is gated.py's, which this runs as ``__main__``.
"""
import dataclasses
import os
import runpy
import sys
import time

WORKERS = os.path.dirname(os.path.abspath(__file__))
GATED = os.path.join(WORKERS, "gated.py")
KEEP = 10 ** 6


def keep_every_commit() -> None:
    import hvdkit.scripting as scripting
    original = scripting.config_from_args

    def config_from_args(args):
        return dataclasses.replace(original(args), keep_checkpoints=KEEP)
    scripting.config_from_args = config_from_args   # the example imports it from there after this


def install_second_gate(step: int, gate_dir: str) -> None:
    from hvdkit.callbacks import Callback
    from hvdkit.trainer import Trainer
    release = os.path.join(gate_dir, "release2")

    class SecondGate(Callback):
        all_ranks = True
        done = False

        def on_step_end(self, trainer, global_step, loss):
            if global_step != step or self.done or os.path.exists(release):
                return
            self.done = True
            name = os.path.join(gate_dir, f"reached2-{os.environ.get('HOROVOD_HOSTNAME', 'localhost')}-{os.getpid()}")
            with open(name + ".tmp", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(name + ".tmp", name)
            deadline = time.time() + float(os.environ.get("HVDKIT_GATE_TIMEOUT", "120"))
            while not os.path.exists(release) and time.time() < deadline:
                time.sleep(0.05)

    original = Trainer.__init__

    def __init__(self, adapter, config=None, callbacks=(), **kw):
        original(self, adapter, config, [SecondGate()] + list(callbacks), **kw)
    Trainer.__init__ = __init__


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: zero_elastic.py SCRIPT [ARGS...]")
    keep_every_commit()
    if os.environ.get("HVDKIT_GATE2_STEP"):
        os.makedirs(os.environ["HVDKIT_GATE_DIR"], exist_ok=True)
        install_second_gate(int(os.environ["HVDKIT_GATE2_STEP"]), os.environ["HVDKIT_GATE_DIR"])
    sys.argv = [GATED, *sys.argv[1:]]
    sys.path[0] = WORKERS
    runpy.run_path(GATED, run_name="__main__")
