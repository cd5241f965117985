"""Worker: run scripts several times in this process, one launch for several runs (argv: OUT_DIR SCRIPT ARGS...
[+++ [SCRIPT] ARGS...]...). A run whose first argument ends in ``.py`` runs that script (and so do the runs after
it, until another names one); the others run the script before them. Each run sees its own command line; a run
that exits non-zero ends the worker with that code. Every rank writes what each of its ``Trainer.fit`` calls
returned to OUT_DIR/run{i}-rank{r}.json (i counts the runs from 0): epochs, steps, the early-stopping verdict,
the monitored record, the evaluation; and OUT_DIR/done{i}-rank{r} once run i returned, holding its seconds (a test
of run i can tell its run completed even when a later one failed).

A launch costs more than most runs (a Keras worker spends 15-25 s starting): tests share one launch between many
runs (tests/conftest.py, ``shared_runs``). Between runs the Keras dtype policy is reset to float32 (a bf16 run sets
it for the process); HVDKIT_RUNS_IMPORT=module[,module] is imported before the first run (``hvdkit.keras``: TF's
thread pools are sized before any script runs a TF op, as a script importing it first would).

    horovodrun -np 2 python tests/workers/runs.py /tmp/out examples/torch_digits.py --epochs 3 +++ --precision bf16
    horovodrun -np 2 python tests/workers/runs.py /tmp/out examples/keras_digits.py +++ examples/keras_synthetic.py
"""
import importlib
import json
import os
import runpy
import sys
import time

SEPARATOR = "+++"
LAUNCH_RANK = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


def runs(argv):
    """The argument lists between separators."""
    groups = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            groups.append([])
        else:
            groups[-1].append(arg)
    return groups


def record_results(out_dir: str, current: dict) -> None:
    """Every rank's FitResult of the run ``current["run"]`` to a file of its own."""
    from hvdkit.trainer import Trainer
    fit = Trainer.fit

    def recorded(self, *args, **kwargs):
        result = fit(self, *args, **kwargs)
        summary = {"rank": result.rank, "world_size": result.world_size, "epochs": result.epochs_done,
                   "global_step": result.global_step, "stopped_early": result.stopped_early, "best": result.best,
                   "eval": result.eval, "skipped_steps": result.skipped_steps}
        if result.world_size > 1:   # a one-process reference inside a check script is no run's result
            with open(os.path.join(out_dir, f"run{current['run']}-rank{result.rank}.json"), "w") as f:
                json.dump(summary, f, default=repr)
        return result
    Trainer.fit = recorded


def reset_keras_policy() -> None:
    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for module in filter(None, os.environ.get("HVDKIT_RUNS_IMPORT", "").split(",")):
        importlib.import_module(module)
    current = {"run": 0}
    record_results(out_dir, current)
    script = None
    for index, args in enumerate(runs(sys.argv[2:])):
        if args and args[0].endswith(".py"):
            script, args = os.path.abspath(args[0]), args[1:]
        if script is None:
            sys.exit("usage: runs.py OUT_DIR SCRIPT [ARGS...] [+++ [SCRIPT] ARGS...]...")
        current["run"] = index
        reset_keras_policy()
        sys.path[0] = os.path.dirname(script)   # as if the script had been started directly
        sys.argv = [script, *args]
        started = time.perf_counter()
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        with open(os.path.join(out_dir, f"done{index}-rank{LAUNCH_RANK}"), "w") as f:
            f.write(f"{time.perf_counter() - started:.1f}\n")   # the run's seconds
