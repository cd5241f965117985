"""Worker: run one script several times in this process, one launch for several runs (argv: OUT_DIR SCRIPT ARGS...
[+++ ARGS...]...). Each run sees its own command line; a run that exits non-zero ends the worker with that code.
Every rank writes what each of its ``Trainer.fit`` calls returned to OUT_DIR/run{i}-rank{r}.json (i counts the
runs from 0): epochs, steps, the early-stopping verdict, the monitored record, the evaluation.

    horovodrun -np 2 python tests/workers/runs.py /tmp/out examples/torch_digits.py --epochs 3 +++ --precision bf16
"""
import json
import os
import runpy
import sys

SEPARATOR = "+++"


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
        with open(os.path.join(out_dir, f"run{current['run']}-rank{result.rank}.json"), "w") as f:
            json.dump(summary, f)
        return result
    Trainer.fit = recorded


if __name__ == "__main__":
    out_dir, script = sys.argv[1], os.path.abspath(sys.argv[2])
    os.makedirs(out_dir, exist_ok=True)
    current = {"run": 0}
    record_results(out_dir, current)
    sys.path[0] = os.path.dirname(script)   # as if the script had been started directly
    for index, args in enumerate(runs(sys.argv[3:])):
        current["run"] = index
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
