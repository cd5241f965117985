"""Drivers of ``hvdkit bench``: launch the workers, collect their JSON, write table, JSON and plot.

Every row (one implementation, or one mode at one worker count) runs in new processes whose environment is built
from a clean base (:func:`_clean_env`, :func:`_row_env`): nothing one row sets reaches the next. Rows are visited in
interleaved rounds, the order rotated each round; figures are medians over rounds with their range. Each row's
workers read back what they really ran with (threads, busy threads, Horovod's controller and tensor operations,
``hvdkit.bench.models``); a read-back that differs from what the row asked is printed and listed in the report.

Example::

    hvdkit bench allreduce --rounds 3 --out results/bench
    hvdkit bench train --rounds 3 --out results/bench
    hvdkit bench zero --workers 1,2,3 --rounds 3 --out results/bench
    hvdkit bench overhead --rounds 5 --out results/bench     (hvdkit.bench.overhead)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from ..errors import HvdkitError
from ..launch import launch_command
from .models import BUSY_SHARE, cpus_allowed
from .provenance import finished, provenance, provenance_line

DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
TORCH_MODES = ["hvdkit-torch", "hvdkit-torch-horovodrun", "hvdkit-torch-gloo", "raw-horovod-torch", "torch-ddp",
               "torch-nocomm"]
KERAS_MODES = ["hvdkit-keras", "hvdkit-keras-loop", "raw-horovod-tf", "tf-mwms"]  # hvdkit-keras: model.fit
# rows that average nothing (each rank trains alone): what no data-parallel row can beat; compared with every other
# baseline ("torch-nocomm / torch-ddp": the most any reducer could be over DDP on this machine)
CEILING_MODES = ["torch-nocomm"]
ZERO_VARIANTS = ["hvdkit", "hvdkit-sharded", "torch-zero"]

# What every row must read back (``ran_with`` of hvdkit.bench.models): compute threads, and its collectives
# (Horovod: controller and CPU tensor ops; others: the backend's name, a prefix).
HOROVOD_MPI = {"threads": 1, "controller": "mpi", "cpu_ops": "mpi"}
HOROVOD_GLOO = {"threads": 1, "controller": "gloo", "cpu_ops": "gloo"}
# bench allreduce: implementation -> (launcher, the settings the row asks for, what it must read back)
ALLREDUCE_ROWS = {
    "mpi4py": ("mpirun", {}, {"backend": "MPI"}),
    "torch.distributed gloo": ("mpirun", {}, {"threads": 1, "backend": "torch.distributed gloo"}),
    "horovod mpi ops": ("mpirun", {"HOROVOD_CPU_OPERATIONS": "mpi"}, HOROVOD_MPI),
    "horovod gloo ops": ("horovodrun", {"HOROVOD_CPU_OPERATIONS": "gloo"}, HOROVOD_GLOO),
    "hvdkit (mpirun)": ("mpirun", {}, HOROVOD_MPI),            # Horovod's build default under mpirun: MPI ops
    "hvdkit (horovodrun)": ("horovodrun", {}, HOROVOD_GLOO),   # horovodrun --gloo (elastic jobs): Gloo throughout
}
# bench train: every mode under mpirun, nothing asked beyond one compute thread (the kit's modes: its own defaults),
# except the same worker as hvdkit-torch under horovodrun: hvdkit-torch-horovodrun with its MPI controller (what
# `hvdkit launch` starts for a static job: mpirun under horovodrun) and hvdkit-torch-gloo with Gloo (controller and
# tensor ops: what elastic jobs run, and static ones with --controller gloo)
TRAIN_LAUNCH = {"hvdkit-torch-horovodrun": ("horovodrun", "mpi"), "hvdkit-torch-gloo": ("horovodrun", "gloo")}
MODEL_TITLES = {"cnn": "small CNN (2 conv + 2 fc, 0.21M parameters)",
                "mlp": "wide MLP (784-2048-2048-10, 5.8M parameters)"}


def _train_launch(mode: str) -> tuple:
    """(launcher, controller) of a bench train mode's row."""
    return TRAIN_LAUNCH.get(mode, ("mpirun", None))


def _launch_label(mode: str) -> str:
    launcher, controller = _train_launch(mode)
    return f"{launcher} --{controller}" if controller else launcher


TRAIN_EXPECT = {"hvdkit-torch": HOROVOD_MPI, "hvdkit-torch-horovodrun": HOROVOD_MPI, "hvdkit-torch-gloo": HOROVOD_GLOO,
                "raw-horovod-torch": HOROVOD_MPI,
                "torch-ddp": {"threads": 1, "backend": "torch.distributed gloo"},
                "torch-nocomm": {"threads": 1, "backend": "none"},
                "hvdkit-keras": HOROVOD_MPI, "hvdkit-keras-loop": HOROVOD_MPI, "raw-horovod-tf": HOROVOD_MPI,
                "tf-mwms": {"threads": 1, "backend": "tf.distribute collective ops"}}
# --probe-ops: Horovod rows keep a dynamic timeline, in which the workers record one allreduce after the measurement:
# the tensor operations it shows are the ones the row ran. For checking, not measuring: an initialized timeline keeps a
# writer thread spinning on rank 0 for the whole row (Horovod 0.28.1's TimelineWriter::WriterLoop; ~0.5 core here)
PROBE = {"HOROVOD_TIMELINE": "DYNAMIC"}
# --variant MODE:HVDKIT_BENCH_BIND=core: the row's mpirun binds each rank to a core (Open MPI's --bind-to) instead of
# the kit's --bind-to none; every row reads back the CPUs its rank 0 may run on (``cpus_allowed`` of ran_with)
BIND_KEY = "HVDKIT_BENCH_BIND"
BINDINGS = ("none", "core", "hwthread")


# ---- a fresh environment per row ---------------------------------------------------------------------------
# Never taken from the caller: a launcher's per-job variables (a bench started inside a job must not hand its rank
# or ring to the rows) and every setting that chooses threads, collectives or the TF/Keras flavour; each row sets
# what it needs itself.
JOB_ENV_PREFIXES = ("HOROVOD_", "OMPI_", "PMIX_", "PRTE_")
CHOSEN_BY_ROW_PREFIXES = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "TF_")
CHOSEN_BY_ROW = ("HVDKIT_THREADS", "HVDKIT_BENCH_PORT", "KERAS_BACKEND")
# every row: one compute thread, quiet native logs
ROW_FIXED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HVDKIT_THREADS": "1",
             "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}


def _clean_env() -> Dict[str, str]:
    """The base every row starts from: a copy of this process's environment now, without a launcher's per-job
    variables and without anything choosing threads, collectives or TF's flavour (see above). Taken once per
    bench; the driver never changes ``os.environ``, and each row gets a fresh copy (:func:`_row_env`)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(JOB_ENV_PREFIXES + CHOSEN_BY_ROW_PREFIXES) and k not in CHOSEN_BY_ROW}


def _row_env(base_env: Dict[str, str], settings: Dict[str, str] = None) -> Dict[str, str]:
    """One row's environment, built anew: ``base_env``, the settings every row has (:data:`ROW_FIXED`), a
    free-looking port for the frameworks that need one, then the row's own ``settings``."""
    return {**base_env, **ROW_FIXED, "HVDKIT_BENCH_PORT": str(random.randint(20000, 40000)), **(settings or {})}


def _run_row(args: Sequence[str], np: int, base_env: Dict[str, str], result: str, timeout: float,
             launcher: str = "horovodrun", settings: Dict[str, str] = None, controller: str = None) -> None:
    """One row: ``python -m args`` on ``np`` new workers under ``launcher`` (horovodrun: ``controller``, by default
    Gloo), in
    :func:`_row_env` (``base_env`` plus ``settings``); a failure before ``result`` exists is tried once more (on
    another port). A job that crashed after writing ``result`` (seen: torch DDP aborting in its teardown) still
    counts. The launcher's process group is killed on a timeout."""
    for attempt in (1, 2):
        env = _row_env(base_env, settings)
        # the bench's horovodrun rows run Gloo (what elastic jobs run) unless they ask for MPI
        if launcher == "horovodrun":
            controller = controller or "gloo"
        cmd = launch_command(["-m", *args], np=np, launcher=launcher, controller=controller)
        if (settings or {}).get(BIND_KEY):   # (parse_variant allows it on mpirun rows only)
            cmd[cmd.index("--bind-to") + 1] = settings[BIND_KEY]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):   # horovodrun stops its workers on SIGTERM
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.communicate(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise HvdkitError(f"benchmark job timed out after {timeout}s: {' '.join(cmd)}") from None
        if proc.returncode == 0 and os.path.exists(result):
            return
        if os.path.exists(result):
            print(f"[bench] note: exit {proc.returncode} after the result was written (teardown)", file=sys.stderr)
            return
        if attempt == 2:
            raise HvdkitError(f"benchmark job failed (exit {proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")


def _rounds(rows: List, rounds: int):
    """(round, row) in interleaved rounds: every round visits every row, the order rotated by one each round."""
    for r in range(rounds):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            yield r, row


def _mismatches(what: str, expect: Dict, ran: Dict) -> List[str]:
    """How a row's read-back ``ran`` (``hvdkit.bench.models.ran_with``) differs from ``expect``: one line each."""
    bad = []
    if "threads" in expect:
        got = ran.get("threads") or {}
        if (got.get("intra_op"), got.get("inter_op")) != (expect["threads"], expect["threads"]):
            bad.append(f"{what}: {got.get('framework')} ran {got.get('intra_op')}/{got.get('inter_op')} "
                       f"intra/inter-op threads, asked {expect['threads']}")
    coll = ran.get("collectives") or {}
    for key in ("controller", "cpu_ops", "cpu_ops_timeline"):
        want = expect.get("cpu_ops" if key == "cpu_ops_timeline" else key)
        if want is not None and (key in coll or key != "cpu_ops_timeline") and coll.get(key) != want:
            bad.append(f"{what}: Horovod {key} {coll.get(key)}, asked {want}")
    bind, unbound = expect.get("knobs", {}).get(BIND_KEY), expect.get("cpus_unbound")
    # bound, rank 0 may still run on every CPU the bench may (more than one): the binding did not take. (Not "more
    # than one CPU": --bind-to core allows every hardware thread of the core.)
    if bind in ("core", "hwthread") and unbound and len(unbound) > 1 and ran.get("cpus_allowed") == unbound:
        bad.append(f"{what}: rank 0 may run on CPUs {_cpu_text(ran['cpus_allowed'])}, every CPU the bench may use, "
                   f"asked {BIND_KEY}={bind}")
    knobs = coll.get("knobs") or {}
    for key, want in expect.get("knobs", {}).items():   # a --variant's settings, as Horovod's C++ side sees them
        if key in knobs and knobs[key] != want:          # (only the knobs Horovod rows read back can be checked)
            bad.append(f"{what}: {key}={knobs[key]}, asked {want}")
    if "backend" in expect and not str(coll.get("backend", "")).startswith(expect["backend"]):
        bad.append(f"{what}: backend {coll.get('backend')}, asked {expect['backend']}")
    return bad


def _spread(values: List[float]) -> Dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def _ran_with_text(ran: Dict) -> tuple:
    """(threads, collectives) of one read-back, as table cells."""
    t = ran.get("threads")
    threads = f"{'torch' if t['framework'] == 'torch' else 'TF'} {t['intra_op']}/{t['inter_op']}" if t else "-"
    c = ran.get("collectives") or {}
    if "controller" in c:
        coll = f"Horovod: {c['controller']} controller, {c['cpu_ops']} ops"
        if "cpu_ops_timeline" in c:
            coll += f" (timeline: {c['cpu_ops_timeline']})"
        reducer = (c.get("knobs") or {}).get("HVDKIT_BENCH_REDUCER")
        if reducer:   # hvdkit's torch rows: the gradient reducer, read back from the model's hooks
            coll += f"; {reducer} reducer"
    else:
        coll = c.get("backend", "-")
    return threads, coll


def _cpu_text(cpus: Optional[List[int]]) -> str:
    """[0, 1, 3] -> "0-1,3" (None: not read back, a report from before the field)."""
    if cpus is None:
        return "-"
    spans, start = [], None
    for i, cpu in enumerate(cpus):
        start = cpu if start is None else start
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            spans.append(f"{start}" if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(spans)


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _progress(i: int, total: int, what: str) -> None:
    print(f"[bench {i}/{total}] {what}", file=sys.stderr, flush=True)


def _warn(mismatches: List[str]) -> None:
    for line in mismatches:
        print(f"[bench] WARNING: read back differs from what the row asked: {line}", file=sys.stderr)


# ---- hvdkit bench allreduce ----------------------------------------------------------------------------------
def bench_allreduce(out_dir: str, sizes: List[int], iters: int, rounds: int = 3,
                    impls: Sequence[str] = tuple(ALLREDUCE_ROWS), probe_ops: bool = False,
                    timeout: float = 900) -> Dict:
    """Bus bandwidth of an in-place float32 allreduce on 2 ranks, one row per implementation (each its own job, in
    its own fresh environment), ``rounds`` interleaved rounds; per size the median over rounds of each round's
    median over ``iters``."""
    os.makedirs(out_dir, exist_ok=True)
    made = provenance()   # before the run: the checkout may change under it
    base_env = _clean_env()
    impls = list(impls)
    found: Dict[str, List[Dict]] = {impl: [] for impl in impls}
    total = len(impls) * rounds
    with tempfile.TemporaryDirectory() as tmp:
        for i, (r, impl) in enumerate(_rounds(impls, rounds), start=1):
            launcher, settings, _ = ALLREDUCE_ROWS[impl]
            _progress(i, total, f"allreduce {impl} under {launcher}, {len(sizes)} sizes, 2 ranks, "
                                f"round {r + 1}/{rounds}")
            raw = os.path.join(tmp, f"allreduce-{impls.index(impl)}-{r}.json")
            _run_row(["hvdkit.bench.allreduce_worker", raw, ",".join(map(str, sizes)), str(iters), impl], 2,
                     base_env, raw, timeout, launcher=launcher, settings={**settings, **(PROBE if probe_ops else {})})
            with open(raw) as f:
                found[impl].append(json.load(f))
    report = dict(_allreduce_report(found, sizes, iters, rounds), probe_ops=probe_ops)
    _warn(report["mismatches"])
    _write(out_dir, "allreduce", report, _allreduce_markdown(report), _allreduce_plot, made)
    return report


def _allreduce_report(found: Dict[str, List[Dict]], sizes: List[int], iters: int, rounds: int) -> Dict:
    """The report from each implementation's worker outputs (one per round, in round order)."""
    world = next(iter(found.values()))[0]["world_size"]
    table, rows, mismatches = {}, {}, []
    for impl, runs in found.items():
        launcher, settings, expect = ALLREDUCE_ROWS[impl]
        for size in sizes:
            busbw = [int(size) / run["results"][str(size)] * 2 * (world - 1) / world / 1e9 for run in runs]
            seconds = statistics.median(run["results"][str(size)] for run in runs)
            table.setdefault(impl, {})[size] = {"seconds": seconds, "busbw_GBps": statistics.median(busbw),
                                                "busbw_GBps_min": min(busbw), "busbw_GBps_max": max(busbw),
                                                "busbw_GBps_runs": busbw}
        bad = [m for run in runs for m in _mismatches(impl, expect, run["ran_with"])]
        mismatches += list(dict.fromkeys(bad))
        rows[impl] = {"launcher": launcher, "asked": settings, "expect": expect,
                      "ran_with": [run["ran_with"] for run in runs]}
    report = {"world_size": world, "sizes": sizes, "iters": iters, "rounds": rounds, "results": table,
              "rows": rows, "mismatches": mismatches, "ratios_at_max": {}}
    memcpy = [run["memcpy_seconds"] for run in found.get("mpi4py", []) if run.get("memcpy_seconds")]
    if memcpy:
        report["memcpy_GBps"] = max(sizes) / statistics.median(memcpy) / 1e9
    biggest = max(sizes)
    for ours, other in (("hvdkit (mpirun)", "mpi4py"), ("hvdkit (mpirun)", "horovod mpi ops"),
                        ("hvdkit (horovodrun)", "mpi4py"), ("hvdkit (horovodrun)", "horovod gloo ops")):
        if ours in table and other in table:   # per round (rows of one round ran back to back), then the median
            per_round = [a / b for a, b in zip(table[ours][biggest]["busbw_GBps_runs"],
                                               table[other][biggest]["busbw_GBps_runs"])]
            report["ratios_at_max"][f"{ours} / {other}"] = _spread(per_round)
    return report


def _allreduce_markdown(r: Dict) -> str:
    impls = list(r["results"])
    spread = r["rounds"] > 1

    def cell(c):
        return f"{c['busbw_GBps']:.2f} ({c['busbw_GBps_min']:.2f}-{c['busbw_GBps_max']:.2f})" if spread \
            else f"{c['busbw_GBps']:.2f}"
    lines = ["| size | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for size in r["sizes"]:
        lines.append(f"| {_human(size)} | " + " | ".join(cell(r["results"][i][size]) for i in impls) + " |")
    lines.append("")
    how = f"median of {r['rounds']} interleaved rounds (min-max)" if spread else "one round"
    memcpy = f" One-process memcpy: {r['memcpy_GBps']:.2f} GB/s." if "memcpy_GBps" in r else ""
    lines.append(f"Bus bandwidth in GB/s, in place, {r['world_size']} ranks; per round the median of {r['iters']} "
                 f"calls, {how}.{memcpy}")
    if r["ratios_at_max"]:
        lines.append("")
        lines.append(f"At {_human(max(r['sizes']))} (per-round ratios: median, min-max):")
        lines += [f"- {k}: {v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})" for k, v in r["ratios_at_max"].items()]
    lines += ["", "What each row ran with (its own job and fresh environment; read back in rank 0):", "",
              "| implementation | launcher | asked | threads (intra/inter) | collectives |", "|---|---|---|---|---|"]
    for impl, row in r["rows"].items():
        cells = {_ran_with_text(ran) for ran in row["ran_with"]}
        asked = ", ".join(f"{k}={v}" for k, v in row["asked"].items()) or "(nothing)"
        for threads, coll in sorted(cells):
            lines.append(f"| {impl} | {row['launcher']} | {asked} | {threads} | {coll} |")
    lines += _mismatch_lines(r["mismatches"]) + _probe_lines(r)
    return "\n".join(lines) + "\n"


def _probe_lines(r: Dict) -> List[str]:
    if not r.get("probe_ops"):
        return []
    return ["", "Run with --probe-ops: Horovod's timeline was on in every Horovod row (its writer thread spins on "
                "rank 0), so these numbers are not comparable with a run without it."]


def _mismatch_lines(mismatches: List[str]) -> List[str]:
    if not mismatches:
        return ["", "Every row read back the threads and collectives it asked for."]
    return ["", "**Read back differs from what the row asked:**"] + [f"- {m}" for m in mismatches]


def _allreduce_plot(r: Dict, ax) -> None:
    for impl, by_size in r["results"].items():
        line, = ax.plot(r["sizes"], [by_size[s]["busbw_GBps"] for s in r["sizes"]], marker="o", label=impl)
        ax.fill_between(r["sizes"], [by_size[s]["busbw_GBps_min"] for s in r["sizes"]],
                        [by_size[s]["busbw_GBps_max"] for s in r["sizes"]], color=line.get_color(), alpha=0.15)
    if "memcpy_GBps" in r:
        ax.axhline(r["memcpy_GBps"], linestyle="--", color="grey", label="memcpy (1 process)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes, float32)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"allreduce, {r['world_size']} ranks, in place, median of {r['rounds']} round(s)")
    ax.legend(fontsize=8)


# ---- hvdkit bench train --------------------------------------------------------------------------------------
def bench_train(out_dir: str, modes: List[str], workers: List[int], steps: int, batch: int, rounds: int,
                probe_ops: bool = False, timeout: float = 900, model: str = "cnn",
                variants: Dict[str, tuple] = None) -> Dict:
    """Samples/s of each mode at each worker count, every (mode, workers) row its own mpirun job in a fresh
    environment, ``rounds`` interleaved rounds; medians, ranges, per-round ratios and scaling efficiency.

    variants: ``{name: (mode, {setting: value})}``, extra rows running ``mode`` with those settings (a lever to
    measure: ``{"hvdkit-torch HOROVOD_CACHE_CAPACITY=0": ("hvdkit-torch", {"HOROVOD_CACHE_CAPACITY": "0"})}``),
    interleaved with the others and compared with their mode's row round by round."""
    os.makedirs(out_dir, exist_ok=True)
    made = provenance()   # before the run: the checkout may change under it
    base_env = _clean_env()
    variants = dict(variants or {})
    bound = [name for name, (_, settings) in variants.items() if settings.get(BIND_KEY, "none") != "none"]
    if bound and max(workers) > (os.cpu_count() or 1):   # Open MPI refuses to bind more ranks than cores
        raise HvdkitError(f"{bound[0]}: binding each rank to a core needs at most {os.cpu_count()} workers on this "
                          f"machine (asked {max(workers)}); pass --workers up to {os.cpu_count()}")
    base = {**{m: (m, {}) for m in modes}, **variants}   # row name -> (mode, settings)
    rows = [(name, w) for w in workers for name in base]
    found: Dict[tuple, List[Dict]] = {row: [] for row in rows}
    total = len(rows) * rounds
    with tempfile.TemporaryDirectory() as tmp:
        for i, (r, (name, world)) in enumerate(_rounds(rows, rounds), start=1):
            mode, settings = base[name]
            launcher, controller = _train_launch(mode)
            _progress(i, total, f"train {name} ({model}) on {world} worker(s), round {r + 1}/{rounds}")
            out = os.path.join(tmp, f"row{rows.index((name, world))}-round{r}.json")
            _run_row(["hvdkit.bench.train_worker", mode, out, str(steps), str(batch), model], world, base_env, out,
                     timeout, launcher=launcher, controller=controller,
                     settings={**(PROBE if probe_ops else {}), **settings})
            with open(out) as f:
                found[(name, world)].append(json.load(f))
    report = dict(_train_report(found, workers, steps, batch, rounds, variants), probe_ops=probe_ops, model=model)
    _warn(report["mismatches"])
    _write(out_dir, train_name(model), report, _train_markdown(report), _train_plot, made)
    return report


def train_name(model: str = "cnn") -> str:
    """The report's file name in ``--out``: ``train`` (the CNN), ``train-mlp``; one directory holds both."""
    return "train" if model == "cnn" else f"train-{model}"


def parse_variant(text: str) -> tuple:
    """``"MODE:KEY=VALUE[,KEY=VALUE]"`` -> (row name, (mode, settings)), or one clear error.

        >>> parse_variant("hvdkit-torch:HOROVOD_CYCLE_TIME=5")
        ('hvdkit-torch HOROVOD_CYCLE_TIME=5', ('hvdkit-torch', {'HOROVOD_CYCLE_TIME': '5'}))
    """
    mode, _, rest = text.partition(":")
    pairs = [p.strip() for p in rest.split(",") if p.strip()]
    if mode not in TORCH_MODES + KERAS_MODES or not pairs or not all("=" in p and p.split("=")[0] for p in pairs):
        raise HvdkitError(f"bad --variant {text!r}; pass MODE:KEY=VALUE[,KEY=VALUE], MODE one of "
                          f"{', '.join(TORCH_MODES + KERAS_MODES)}, e.g. hvdkit-torch:HOROVOD_CYCLE_TIME=5")
    settings = dict(p.split("=", 1) for p in pairs)
    bind = settings.get(BIND_KEY)
    if bind is not None and bind not in BINDINGS:
        raise HvdkitError(f"bad --variant {text!r}: {BIND_KEY} takes one of {', '.join(BINDINGS)} (mpirun's "
                          f"--bind-to), e.g. hvdkit-torch:{BIND_KEY}=core")
    if bind is not None and _train_launch(mode)[0] != "mpirun":
        raise HvdkitError(f"bad --variant {text!r}: {BIND_KEY} binds the ranks of a mode run under mpirun, not "
                          f"{mode} (horovodrun starts its own mpirun, or none); e.g. hvdkit-torch:{BIND_KEY}=core")
    return f"{mode} " + " ".join(f"{k}={v}" for k, v in settings.items()), (mode, settings)


def _train_report(found: Dict[tuple, List[Dict]], workers: List[int], steps: int, batch: int, rounds: int,
                  variants: Dict[str, tuple] = None) -> Dict:
    """The report from each (row, workers) row's worker outputs (one per round, in round order)."""
    variants = variants or {}
    names = list(dict.fromkeys(name for name, _ in found))
    mode_of = {n: variants[n][0] if n in variants else n for n in names}
    results, mismatches = {}, []
    unbound = cpus_allowed()   # the driver's CPUs
    for (name, world), runs in found.items():
        expect = {**TRAIN_EXPECT[mode_of[name]], "knobs": variants[name][1] if name in variants else {},
                  "cpus_unbound": unbound}
        bad = [m for run in runs for m in _mismatches(f"{name} @{world}", expect, run["ran_with"])]
        mismatches += list(dict.fromkeys(bad))
        results.setdefault(name, {})[str(world)] = {**_spread([run["samples_per_sec"] for run in runs]),
                                                    "ran_with": [run["ran_with"] for run in runs]}

    def per_round(a, b, w):   # per round: the rows of one round ran close together
        return _spread([x / y for x, y in zip(results[a][w]["runs"], results[b][w]["runs"])])

    ratios = {}
    for family in (TORCH_MODES, KERAS_MODES):
        present = [n for n in names if mode_of[n] in family]
        for ours in (n for n in present if n.startswith("hvdkit")):
            for other in (n for n in present if not n.startswith("hvdkit")):
                for w in map(str, workers):
                    ratios[f"{ours} / {other} @{w}"] = per_round(ours, other, w)
        for ceiling in (n for n in present if mode_of[n] in CEILING_MODES):
            for other in (n for n in present if not n.startswith("hvdkit") and mode_of[n] not in CEILING_MODES):
                for w in map(str, workers):
                    ratios[f"{ceiling} / {other} @{w}"] = per_round(ceiling, other, w)
    for name, (mode, _) in variants.items():   # a lever against the same mode without it
        if mode in results:
            for w in map(str, workers):
                ratios[f"{name} / {mode} @{w}"] = per_round(name, mode, w)
    base = min(workers)
    scaling = {m: {str(w): _spread([b * base / (w * a) for a, b in zip(results[m][str(base)]["runs"],
                                                                        results[m][str(w)]["runs"])])
                   for w in workers if w != base} for m in names}
    return {"steps": steps, "batch_per_worker": batch, "rounds": rounds, "workers": workers,
            "launcher": {n: _launch_label(mode_of[n]) for n in names},
            "variants": {n: variants[n][1] for n in names if n in variants},
            "results": results, "ratios": ratios, "scaling_efficiency": scaling, "mismatches": mismatches}


def _train_markdown(r: Dict) -> str:
    ws, base = r["workers"], min(r["workers"])
    more = [w for w in ws if w != base]
    lines = ["| mode | " + " | ".join(f"{w} worker(s): samples/s" for w in ws) + "".join(
        f" | scaling {base}->{w}" for w in more) + " |", "|---|" + "---|" * (len(ws) + len(more))]
    for mode, by_w in r["results"].items():
        cells = [f"{by_w[str(w)]['median']:.0f} ({by_w[str(w)]['min']:.0f}-{by_w[str(w)]['max']:.0f})" for w in ws]
        cells += [f"{e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f})"
                  for e in (r["scaling_efficiency"][mode][str(w)] for w in more)]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Model: {MODEL_TITLES[r.get('model', 'cnn')]}. Batch {r['batch_per_worker']} per worker, {r['steps']} timed steps after as many warm-up steps, "
                 f"median of {r['rounds']} interleaved round(s) (min-max)"
                 + (f"; scaling: samples/s at N workers / (N x at {base}), per round" if more else "")
                 + ". Ratios (per round, then the median; min-max):")
    lines += [f"- {k}: {v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})" for k, v in r["ratios"].items()]
    launchers = ", ".join(sorted({f"{launcher}: {', '.join(m for m, l in r['launcher'].items() if l == launcher)}"
                                  for launcher in r["launcher"].values()}))
    lines += ["", f"What each row ran with (its own job, {launchers}, and a fresh environment; read back in rank 0; "
                  f"busy threads: those holding at least {int(100 * BUSY_SHARE)}% of the process's CPU time while "
                  "training; cores used: the process's CPU time / wall time; CPUs allowed: those rank 0 may run "
                  "on):", "",
              "| mode | workers | threads (intra/inter) | busy threads | cores used | CPUs allowed | collectives |",
              "|---|---|---|---|---|---|---|"]
    for mode, by_w in r["results"].items():
        for w in ws:
            rans = by_w[str(w)]["ran_with"]
            busy = sorted(ran.get("busy_threads", 0) for ran in rans)
            busy = f"{busy[0]}" if busy[0] == busy[-1] else f"{busy[0]}-{busy[-1]}"
            cores = statistics.median(ran.get("cpu_cores_used", 0) for ran in rans)
            cpus = " / ".join(dict.fromkeys(_cpu_text(ran.get("cpus_allowed")) for ran in rans))
            for threads, coll in sorted({_ran_with_text(ran) for ran in rans}):
                lines.append(f"| {mode} | {w} | {threads} | {busy} | {cores:.2f} | {cpus} | {coll} |")
    lines += _mismatch_lines(r["mismatches"]) + _probe_lines(r)
    return "\n".join(lines) + "\n"


def _train_plot(r: Dict, ax) -> None:
    modes, ws = list(r["results"]), r["workers"]
    width = 0.8 / len(ws)
    for j, w in enumerate(ws):
        cells = [r["results"][m][str(w)] for m in modes]
        ax.bar([i + j * width for i in range(len(modes))], [c["median"] for c in cells], width,
               yerr=[[c["median"] - c["min"] for c in cells], [c["max"] - c["median"] for c in cells]],
               capsize=2, label=f"{w} worker(s)")
    ax.set_xticks([i + width * (len(ws) - 1) / 2 for i in range(len(modes))])
    ax.set_xticklabels(modes, rotation=20, fontsize=8)
    ax.set_ylabel("samples/s (median, min-max)")
    ax.set_title(f"{MODEL_TITLES[r.get('model', 'cnn')]}, batch {r['batch_per_worker']} per worker, "
                 f"{r['rounds']} round(s)")
    ax.legend(fontsize=8)


# ---- hvdkit bench combine: the spread over whole runs -----------------------------------------------------------
def combine_train(reports: List[Dict]) -> Dict:
    """The spread over whole runs of ``bench train`` (each a ``train.json``): per ratio and per (mode, workers), each
    run's median and the median and range of those. Only what every run measured; runs of one model only.

        >>> combine_train([json.load(open(f"r{i}/train.json")) for i in (1, 2, 3)])["ratios"]  # doctest: +SKIP
        {'hvdkit-torch / torch-ddp @2': {'median': 1.2, 'min': 1.05, 'max': 1.24, 'runs': [1.05, 1.2, 1.24]}, ...}
    """
    if len(reports) < 2:
        raise HvdkitError("bench combine needs at least 2 runs; pass the --out directories of several bench train runs")
    models = sorted({r.get("model", "cnn") for r in reports})
    if len(models) > 1:
        raise HvdkitError(f"bench combine got runs of different models ({', '.join(models)}); combine one model's runs")
    common = lambda key: [k for k in reports[0][key] if all(k in r[key] for r in reports)]
    ratios = {k: _spread([r["ratios"][k]["median"] for r in reports]) for k in common("ratios")}
    speeds = {f"{m} @{w}": _spread([r["results"][m][w]["median"] for r in reports])
              for m in common("results") for w in reports[0]["results"][m]
              if all(w in r["results"][m] for r in reports)}
    return {"model": models[0], "runs": len(reports), "rounds": [r["rounds"] for r in reports], "ratios": ratios,
            "samples_per_sec": speeds}


def _combined_markdown(c: Dict) -> str:
    runs = range(1, c["runs"] + 1)
    head = "| | " + " | ".join(f"run {i}" for i in runs) + " | over runs: median (min-max) |"
    rule = "|---|" + "---|" * (c["runs"] + 1)

    def table(title, rows, fmt):
        out = [head.replace("| |", f"| {title} |", 1), rule]
        for name, v in rows.items():
            out.append(f"| {name} | " + " | ".join(fmt(x) for x in v["runs"])
                       + f" | {fmt(v['median'])} ({fmt(v['min'])}-{fmt(v['max'])}) |")
        return out

    lines = [f"{c['runs']} runs of `hvdkit bench train` ({MODEL_TITLES[c['model']]}; rounds per run: "
             f"{', '.join(map(str, c['rounds']))}); each cell is that run's median over its interleaved rounds.", ""]
    lines += table("ratio", c["ratios"], lambda x: f"{x:.2f}x") + [""]
    lines += table("samples/s", c["samples_per_sec"], lambda x: f"{x:.0f}")
    return "\n".join(lines) + "\n"


def bench_combine(out_dir: str, run_dirs: List[str], model: str = "cnn") -> Dict:
    """Read ``model``'s report (``train.json``, ``train-mlp.json``) from each of ``run_dirs``; write
    ``train-runs.md`` and ``.json`` (``train-mlp-runs.*``) to ``out_dir``."""
    reports = []
    for d in run_dirs:
        path = os.path.join(d, f"{train_name(model)}.json")
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as e:
            raise HvdkitError(f"cannot read {path} ({e}); pass directories a `hvdkit bench train --out` wrote") from None
    combined = combine_train(reports)
    os.makedirs(out_dir, exist_ok=True)
    markdown = _combined_markdown(combined)
    footers = [f"- run {i}: {provenance_line(r.get('provenance'))}" for i, r in enumerate(reports, 1)
               if r.get("provenance")]
    if footers:
        markdown += "\n" + "\n".join(footers) + "\n"
    name = f"{train_name(model)}-runs"
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(dict(combined, run_dirs=list(run_dirs), run_provenance=[r.get("provenance") for r in reports]),
                  f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {out_dir}/{name}.md and .json", file=sys.stderr)
    return combined


def _write(out_dir: str, name: str, report: Dict, markdown: str, plot, made: Dict) -> None:
    """Write ``name``.json, .md and .png; ``made``: :func:`provenance` as the bench started."""
    report["provenance"] = finished(made)
    markdown = f"{markdown.rstrip()}\n\n{provenance_line(report['provenance'])}\n"
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot(report, ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=110)
    plt.close(fig)
    print(markdown)
    print(f"wrote {out_dir}/{name}.md, .json and .png", file=sys.stderr)


# ---- hvdkit bench zero: optimizer-state memory and speed, sharded vs unsharded vs torch's ZeRO ---------------
def bench_zero(out_dir: str, workers: List[int], rounds: int = 3, steps: int = 20, batch: int = 32,
               model: str = "mlp", width: int = 1024, depth: int = 4, variants: Sequence[str] = ZERO_VARIANTS,
               timeout: float = 900) -> Dict:
    """Adam's state held per rank, gradients held per rank, peak RSS per rank and samples/s of each variant (see
    ``hvdkit.bench.zero_worker``) at each worker count. Each (variant, workers) row runs in new processes with a
    fresh copy of one environment; every round runs every row (rows interleaved, the order rotated each round);
    each figure is the median over rounds of its largest value over ranks."""
    os.makedirs(out_dir, exist_ok=True)
    made = provenance()   # before the run: the checkout may change under it
    base_env = _clean_env()
    rows = [(v, w) for w in workers for v in variants]
    runs: Dict[tuple, List[Dict]] = {row: [] for row in rows}
    total, i = len(rows) * rounds, 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            shift = r % len(rows)
            for variant, world in rows[shift:] + rows[:shift]:
                i += 1
                _progress(i, total, f"zero {variant} on {world} worker(s), round {r + 1}/{rounds}")
                out = os.path.join(tmp, f"{variant}-{world}-{r}.json")
                _run_row(["hvdkit.bench.zero_worker", variant, out, str(steps), str(batch), model, str(width),
                          str(depth)], world, base_env, out, timeout)
                with open(out) as f:
                    runs[(variant, world)].append(json.load(f))
    results: Dict[str, Dict[str, Dict]] = {}
    for (variant, world), found in runs.items():
        def median_of_largest(key):
            return statistics.median(max(rank[key] for rank in run["ranks"]) for run in found)
        speeds = [run["samples_per_sec"] for run in found]
        results.setdefault(variant, {})[str(world)] = {
            "state_bytes": median_of_largest("state_bytes"),
            # the sharded variant's float32 copy of its slice of the parameters (the inner optimizer steps it), held
            # for the whole run: not optimizer state, but memory the unsharded variants do not spend
            "master_bytes": statistics.median(max(rank.get("master_bytes", 0) for rank in run["ranks"])
                                              for run in found),
            "grad_bytes_after_step": median_of_largest("grad_bytes_after_step"),
            "grad_bytes_at_step": median_of_largest("grad_bytes_at_step"),
            "peak_rss_bytes": median_of_largest("peak_rss_bytes"),
            "samples_per_sec": statistics.median(speeds), "samples_per_sec_min": min(speeds),
            "samples_per_sec_max": max(speeds), "runs": found}
    first = runs[rows[0]][0]
    report = {"model": {"kind": model, "width": width, "depth": depth, "params": first["params"],
                        "param_bytes": 4 * first["params"], "largest_param": first["largest_param"],
                        "param_tensors": first["param_tensors"]},
              "optimizer": "Adam", "steps": steps, "batch_per_worker": batch, "rounds": rounds, "workers": workers,
              "variants": list(variants), "launcher": "horovodrun (Gloo); torch-zero: torch.distributed gloo + DDP",
              "results": results}
    _write(out_dir, "zero", report, _zero_markdown(report), _zero_plot, made)
    return report


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f}"


def _zero_markdown(r: Dict) -> str:
    lines = ["| variant | workers | optimizer state / rank (MiB) | fp32 parameter slice / rank (MiB) | "
             "grads after step / rank (MiB) | grads at the step / rank (MiB) | peak RSS / rank (MiB) | "
             "samples/s (median, range) |", "|---|---|---|---|---|---|---|---|"]
    for world in r["workers"]:
        for variant in r["variants"]:
            row = r["results"][variant][str(world)]
            lines.append(f"| {variant} | {world} | {_mib(row['state_bytes'])} | {_mib(row.get('master_bytes', 0))} | "
                         f"{_mib(row['grad_bytes_after_step'])} | "
                         f"{_mib(row['grad_bytes_at_step'])} | {_mib(row['peak_rss_bytes'])} | "
                         f"{row['samples_per_sec']:.0f} ({row['samples_per_sec_min']:.0f}-"
                         f"{row['samples_per_sec_max']:.0f}) |")
    m = r["model"]
    what = (f"MLP 784-{m['width']}x{m['depth'] + 1}-10" if m["kind"] == "mlp" else "the small CNN")
    lines.append("")
    lines.append(f"{what}, {m['params']:,} parameters ({_mib(m['param_bytes'])} MiB float32, largest tensor "
                 f"{m['largest_param']:,}), Adam, batch {r['batch_per_worker']} per worker, {r['steps']} timed steps "
                 f"after as many warm-up steps, one thread per worker; per rank the largest over ranks, median of "
                 f"{r['rounds']} interleaved rounds. Bytes are counted from the tensors after the last step (grads "
                 f"at the step: held while the optimizer stepped); peak RSS is ru_maxrss over the whole process.")
    return "\n".join(lines) + "\n"


def _zero_plot(r: Dict, ax) -> None:
    for variant in r["variants"]:
        ax.plot(r["workers"], [r["results"][variant][str(w)]["state_bytes"] / (1 << 20) for w in r["workers"]],
                marker="o", label=variant)
    ax.set_xticks(r["workers"])
    ax.set_xlabel("workers")
    ax.set_ylabel("Adam state per rank (MiB, largest rank)")
    ax.set_title(f"optimizer state per rank, {r['model']['params']:,} parameters")
    ax.legend(fontsize=8)


PROBE_HELP = ("check Horovod's tensor operations in its timeline (one allreduce recorded after each row's "
              "measurement); the timeline's writer thread spins on rank 0 throughout, so numbers from such a run are "
              "not comparable")


def _csv_choices(text: str, choices: Sequence[str], what: str) -> List[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in choices]
    if unknown or not chosen:
        raise HvdkitError(f"unknown {what} {unknown}; choose from {', '.join(choices)}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hvdkit bench")
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("allreduce", help="allreduce bus bandwidth vs message size, 2 ranks, one job per implementation")
    a.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="bytes, comma separated")
    a.add_argument("--iters", type=int, default=20, help="timed calls per size and round (their median counts)")
    a.add_argument("--rounds", type=int, default=3, help="every implementation once per round; the median is reported")
    a.add_argument("--impls", default=",".join(ALLREDUCE_ROWS), help="implementations, comma separated")
    a.add_argument("--probe-ops", action="store_true", help=PROBE_HELP)
    a.add_argument("--out", default="results/bench")
    t = sub.add_parser("train", help="training samples/s at 1 and 2 workers against the peers")
    t.add_argument("--modes", default=",".join(TORCH_MODES + KERAS_MODES))
    t.add_argument("--workers", default="1,2")
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=3,
                   help="every (mode, workers) row once per round; the median is reported")
    t.add_argument("--model", choices=sorted(MODEL_TITLES), default="cnn", help="; ".join(
        f"{k}: {v}" for k, v in sorted(MODEL_TITLES.items())))
    t.add_argument("--variant", action="append", default=[], metavar="MODE:KEY=VALUE[,KEY=VALUE]",
                   help="an extra row: MODE with these settings, compared with MODE's row round by round "
                        "(repeatable), e.g. hvdkit-torch:HOROVOD_CYCLE_TIME=5; HVDKIT_BENCH_BIND=core (mpirun rows) "
                        "binds each rank to a core")
    t.add_argument("--probe-ops", action="store_true", help=PROBE_HELP)
    t.add_argument("--out", default="results/bench")
    c = sub.add_parser("combine", help="the spread over whole runs of bench train: each ratio's median per run")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="the --out directories of bench train runs")
    c.add_argument("--model", choices=sorted(MODEL_TITLES), default="cnn", help="whose runs to combine")
    c.add_argument("--out", default="results/bench")
    o = sub.add_parser("overhead", help="the kit's cost per step at 1 worker against plain loops, rows interleaved "
                                        "in one process per framework and model")
    o.add_argument("--frameworks", default="torch,keras")
    o.add_argument("--models", default="cnn,mlp")
    o.add_argument("--steps", type=int, default=40)
    o.add_argument("--batch", type=int, default=64)
    o.add_argument("--rounds", type=int, default=5, help="every row once per round; the median is reported")
    o.add_argument("--out", default="results/bench")
    z = sub.add_parser("zero", help="Adam state, gradients and peak RSS per rank, samples/s: hvdkit unsharded, "
                                    "hvdkit sharded, torch ZeroRedundancyOptimizer; at 1, 2 and 3 workers")
    z.add_argument("--workers", default="1,2,3")
    z.add_argument("--rounds", type=int, default=3, help="every row once per round; the median is reported")
    z.add_argument("--steps", type=int, default=20, help="timed steps (after as many warm-up steps)")
    z.add_argument("--batch", type=int, default=32, help="samples per worker per step")
    z.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                   help="mlp: 784 -> width, depth x width -> width, -> 10; cnn: the small CNN of bench train")
    z.add_argument("--width", type=int, default=1024)
    z.add_argument("--depth", type=int, default=4)
    z.add_argument("--variants", default=",".join(ZERO_VARIANTS))
    z.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    started = time.time()
    if args.what == "allreduce":
        if args.rounds < 1 or args.iters < 1:
            raise HvdkitError("bench allreduce needs --rounds and --iters >= 1")
        bench_allreduce(args.out, [int(s) for s in args.sizes.split(",")], args.iters, args.rounds,
                        _csv_choices(args.impls, list(ALLREDUCE_ROWS), "bench allreduce implementations"),
                        args.probe_ops)
    elif args.what == "overhead":
        from .overhead import FRAMEWORKS, MODELS, bench_overhead
        if args.rounds < 1 or args.steps < 1 or args.batch < 1:
            raise HvdkitError("bench overhead needs --rounds, --steps and --batch >= 1")
        bench_overhead(args.out, _csv_choices(args.frameworks, FRAMEWORKS, "bench overhead frameworks"),
                       _csv_choices(args.models, MODELS, "bench overhead models"), args.steps, args.batch, args.rounds)
    elif args.what == "combine":
        bench_combine(args.out, args.runs, args.model)
    elif args.what == "zero":
        variants = args.variants.split(",")
        unknown = set(variants) - set(ZERO_VARIANTS)
        if unknown:
            raise HvdkitError(f"unknown bench zero variants {sorted(unknown)}; choose from {', '.join(ZERO_VARIANTS)}")
        if args.rounds < 1 or args.steps < 1 or args.batch < 1 or args.width < 1 or args.depth < 0:
            raise HvdkitError("bench zero needs --rounds, --steps, --batch and --width >= 1 and --depth >= 0")
        bench_zero(args.out, [int(w) for w in args.workers.split(",")], args.rounds, args.steps, args.batch,
                   args.model, args.width, args.depth, variants)
    else:
        modes = _csv_choices(args.modes, TORCH_MODES + KERAS_MODES, "bench modes")
        if args.rounds < 1 or args.steps < 1 or args.batch < 1:
            raise HvdkitError("bench train needs --rounds, --steps and --batch >= 1")
        variants = dict(parse_variant(v) for v in args.variant)
        missing = sorted({mode for mode, _ in variants.values()} - set(modes))
        if missing:
            raise HvdkitError(f"--variant of {', '.join(missing)}, which --modes leaves out: its lever would have no "
                              f"row to compare with; add {', '.join(missing)} to --modes")
        bench_train(args.out, modes, sorted({int(w) for w in args.workers.split(",")}), args.steps, args.batch,
                    args.rounds, args.probe_ops, model=args.model, variants=variants)
    print(f"bench: done in {time.time() - started:.0f} s", file=sys.stderr)
    return 0
