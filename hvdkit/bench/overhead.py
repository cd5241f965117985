"""``hvdkit bench overhead``: the kit's cost per step at one worker against plain loops, rows interleaved in one process.

One fresh process per (framework, model) (``hvdkit.bench.overhead_worker``, environment built from the bench's clean
base); inside it the rows take turns round after round, so the per-round ratios are free of the swings between
processes that ``bench train``'s 1-worker rows carry. The target is the issue's: the kit at most 3% slower than the
plain loop (a ratio >= 0.97).

Example::

    hvdkit bench overhead --rounds 5 --out results/bench    # overhead.md, .json, .png
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List

from ..errors import HvdkitError
from .provenance import provenance
from .run import _clean_env, _row_env, _spread, _write   # the bench's clean base, spread and writer

TARGET = 0.97
# (row, baseline) pairs reported per framework: the kit against the plain loop; the guard's share; Keras' fit
# against a plain loop and against its own plain fit, and plain fit against the plain loop (what fit itself costs)
RATIOS = {"torch": [("hvdkit", "plain"), ("hvdkit-guard-off", "plain"), ("hvdkit", "hvdkit-guard-off")],
          "keras": [("hvdkit-loop", "plain-loop"), ("hvdkit-fit", "plain-fit"), ("hvdkit-fit", "plain-loop"),
                    ("plain-fit", "plain-loop")]}
# the target is the kit against a plain loop; the other ratios say where a gap comes from
TARGET_RATIOS = {"hvdkit / plain", "hvdkit-loop / plain-loop", "hvdkit-fit / plain-loop"}
FRAMEWORKS = list(RATIOS)
MODELS = ["cnn", "mlp"]


def overhead_report(found: List[Dict]) -> Dict:
    """The report from the workers' outputs: per (framework, model) each row's samples/s and each pair's ratio, per
    round then the median and range, with the verdict on the 3% target for the kit's rows."""
    cases, mismatches = [], []
    for out in found:
        case = f"{out['framework']} {out['model']}"
        # every row one compute thread, as in bench train: read back after each row's turn (they share the process)
        turns = [(name, t) for name, ts in out.get("threads", {}).items() for t in ts] or [("", out["ran_with"]["threads"])]
        for name, t in turns:
            if (t["intra_op"], t["inter_op"]) != (1, 1):
                mismatches.append(f"{case}{' ' + name if name else ''}: {t['framework']} ran {t['intra_op']}/"
                                  f"{t['inter_op']} intra/inter-op threads, asked 1")
                break
        samples = out.get("samples", {})
        if samples and len({tuple(v) for v in samples.values()}) > 1:   # like for like: the same work per turn
            mismatches.append(f"{case}: the rows trained different sample counts per turn {samples}")
        rows = out["rows"]
        ratios = {}
        for row, base in RATIOS[out["framework"]]:
            per_round = [a / b for a, b in zip(rows[row], rows[base])]
            ratios[f"{row} / {base}"] = _spread(per_round)
        cases.append({"framework": out["framework"], "model": out["model"], "steps": out["steps"],
                      "batch": out["batch"], "rounds": out["rounds"], "ran_with": out["ran_with"],
                      "rows": {name: _spread(values) for name, values in rows.items()}, "ratios": ratios,
                      "samples": out.get("samples", {}), "threads": out.get("threads", {}),
                      "met": {key: r["median"] >= TARGET for key, r in ratios.items() if key in TARGET_RATIOS}})
    return {"target": TARGET, "cases": cases, "mismatches": mismatches}


def _cell(s: Dict, digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def overhead_markdown(report: Dict) -> str:
    lines = []
    for case in report["cases"]:
        t = case["ran_with"]["threads"]
        lines += [f"**{case['framework']}, {case['model']}** ({case['steps']} steps of batch {case['batch']}, "
                  f"{case['rounds']} interleaved rounds in one process; ran with {t['framework']} "
                  f"{t['intra_op']}/{t['inter_op']} intra/inter-op threads, "
                  f"{case['ran_with']['busy_threads']} busy thread(s))", "",
                  "| row | samples/s, median (min-max) |", "|---|---|"]
        lines += [f"| {name} | {_cell(s)} |" for name, s in case["rows"].items()]
        lines += [""] + [f"- {key}: {_cell(r, 3)}x" + (
            f" ({'met' if case['met'][key] else 'NOT met'}: target >= {report['target']})" if key in case["met"] else "")
            for key, r in case["ratios"].items()] + [""]
    if report["mismatches"]:
        lines += ["**Read back differs from what the row asked:**", ""] + [f"- {m}" for m in report["mismatches"]]
    return "\n".join(lines)


def _plot(report: Dict, ax) -> None:
    labels, medians, low, high = [], [], [], []
    for case in report["cases"]:
        for key, r in case["ratios"].items():
            labels.append(f"{case['framework']} {case['model']}: {key}")
            medians.append(r["median"])
            low.append(r["median"] - r["min"])
            high.append(r["max"] - r["median"])
    ax.barh(range(len(labels)), medians, xerr=[low, high], color="tab:blue", alpha=0.7)
    ax.axvline(report["target"], color="tab:red", linestyle="--", label=f"target {report['target']}")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("per-round ratio, median (min-max)")
    ax.set_title("hvdkit at 1 worker against plain loops, one process")
    ax.legend(loc="lower right", fontsize=7)


def _run_worker(args: List[str], env: Dict[str, str], timeout: float) -> None:
    cmd = [sys.executable, "-m", "hvdkit.bench.overhead_worker", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise HvdkitError(f"benchmark job timed out after {timeout}s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise HvdkitError(f"benchmark job failed (exit {proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")


def bench_overhead(out_dir: str, frameworks: List[str], models: List[str], steps: int = 40, batch: int = 64,
                   rounds: int = 5, timeout: float = 1800) -> Dict:
    """Run one worker per (framework, model) in a fresh environment; write ``overhead.md``, ``.json``, ``.png``."""
    os.makedirs(out_dir, exist_ok=True)
    made = provenance()   # before the run: the checkout may change under it
    base, found = _clean_env(), []
    with tempfile.TemporaryDirectory() as tmp:
        for framework in frameworks:
            for model in models:
                result = os.path.join(tmp, f"{framework}-{model}.json")
                print(f"[bench] overhead: {framework} {model}, {rounds} rounds", file=sys.stderr, flush=True)
                _run_worker([framework, model, result, str(steps), str(batch), str(rounds)], _row_env(base), timeout)
                with open(result) as f:
                    found.append(json.load(f))
    report = overhead_report(found)
    _write(out_dir, "overhead", report, overhead_markdown(report), _plot, made)
    return report
