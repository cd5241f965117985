"""Drivers of ``hvdkit bench``: launch the workers, collect their JSON, write table, JSON and plot.

Example::

    hvdkit bench allreduce --out results/bench
    hvdkit bench train --repeats 3 --out results/bench
    hvdkit bench zero --workers 1,2,3 --rounds 3 --out results/bench
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
from typing import Dict, List, Sequence

from ..errors import HvdkitError
from ..launch import launch_command

DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
TORCH_MODES = ["hvdkit-torch", "raw-horovod-torch", "torch-ddp"]
KERAS_MODES = ["hvdkit-keras", "hvdkit-keras-loop", "raw-horovod-tf", "tf-mwms"]  # hvdkit-keras: model.fit
ZERO_VARIANTS = ["hvdkit", "hvdkit-sharded", "torch-zero"]
# a launcher's per-job variables: a bench started inside a job must not hand its rank or ring to the rows
JOB_ENV_PREFIXES = ("HOROVOD_", "OMPI_", "PMIX_", "PRTE_")


def _run(args: Sequence[str], np: int, timeout: float, launcher: str = "mpirun", result: str = None) -> None:
    """Run one worker job; a job that crashed after writing ``result`` (seen: torch DDP aborting in its
    teardown) still counts, and a job that failed before is tried once more on another port."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    for attempt in (1, 2):
        cmd = launch_command(["-m", *args], np=np, launcher=launcher,
                             env={"HVDKIT_BENCH_PORT": str(random.randint(20000, 40000))})
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise HvdkitError(f"benchmark job timed out after {timeout}s: {' '.join(cmd)}") from None
        if done.returncode == 0:
            return
        if result and os.path.exists(result):
            print(f"[bench] note: exit {done.returncode} after the result was written (teardown)", file=sys.stderr)
            return
        if attempt == 2:
            raise HvdkitError(f"benchmark job failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _progress(i: int, total: int, what: str) -> None:
    print(f"[bench {i}/{total}] {what}", file=sys.stderr, flush=True)


def bench_allreduce(out_dir: str, sizes: List[int], iters: int, timeout: float = 900) -> Dict:
    os.makedirs(out_dir, exist_ok=True)
    jobs = [("mpirun", "mpi4py,torch.distributed gloo,horovod mpi ops,hvdkit default"),
            ("horovodrun", "horovod gloo ops")]   # Gloo tensor ops need the Gloo controller
    data = {"results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (launcher, impls) in enumerate(jobs, start=1):
            _progress(i, len(jobs), f"allreduce under {launcher}: {impls}; {len(sizes)} sizes, 2 ranks")
            raw = os.path.join(tmp, f"allreduce-{i}.json")
            _run(["hvdkit.bench.allreduce_worker", raw, ",".join(map(str, sizes)), str(iters), impls],
                 np=2, timeout=timeout, launcher=launcher, result=raw)
            with open(raw) as f:
                part = json.load(f)
            data["world_size"] = part["world_size"]
            for impl, by_size in part["results"].items():
                data["results"].setdefault(impl, by_size)
    world = data["world_size"]
    table = {}
    for impl, by_size in data["results"].items():
        for size, seconds in by_size.items():
            algbw = int(size) / seconds
            busbw = algbw if impl.startswith("memcpy") else algbw * 2 * (world - 1) / world
            table.setdefault(impl, {})[int(size)] = {"seconds": seconds, "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw / 1e9}
    biggest = max(sizes)
    ref = table["mpi4py"][biggest]["busbw_GBps"]
    report = {"world_size": world, "sizes": sizes, "iters": iters, "results": table,
              "ratio_hvdkit_vs_mpi4py_at_max": table["hvdkit default"][biggest]["busbw_GBps"] / ref}
    _write(out_dir, "allreduce", report, _allreduce_markdown(report), _allreduce_plot)
    return report


def _allreduce_markdown(r: Dict) -> str:
    impls = [k for k in r["results"] if not k.startswith("memcpy")]
    lines = ["| size | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for size in r["sizes"]:
        cells = [f"{r['results'][i][size]['busbw_GBps']:.2f}" for i in impls]
        lines.append(f"| {_human(size)} | " + " | ".join(cells) + " |")
    memcpy = next(iter(r["results"]["memcpy (1 process)"].values()))["busbw_GBps"]
    lines.append("")
    lines.append(f"Bus bandwidth in GB/s, in place, {r['world_size']} ranks (median of {r['iters']}). One-process "
                 f"memcpy: {memcpy:.2f} GB/s. hvdkit / mpi4py at {_human(max(r['sizes']))}: "
                 f"{r['ratio_hvdkit_vs_mpi4py_at_max']:.2f}x.")
    return "\n".join(lines) + "\n"


def _allreduce_plot(r: Dict, ax) -> None:
    for impl, by_size in r["results"].items():
        if impl.startswith("memcpy"):
            ax.axhline(next(iter(by_size.values()))["busbw_GBps"], linestyle="--", color="grey", label=impl)
            continue
        ax.plot(r["sizes"], [by_size[s]["busbw_GBps"] for s in r["sizes"]], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes, float32)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"allreduce, {r['world_size']} ranks, in place")
    ax.legend(fontsize=8)


def bench_train(out_dir: str, modes: List[str], workers: List[int], steps: int, batch: int, repeats: int,
                timeout: float = 900) -> Dict:
    os.makedirs(out_dir, exist_ok=True)
    runs = {(m, w): [] for m in modes for w in workers}
    total, i = len(runs) * repeats, 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # interleaved: the machine's speed drifts, so each repeat visits every config
            for mode, world in runs:
                i += 1
                _progress(i, total, f"train {mode} on {world} worker(s)")
                out = os.path.join(tmp, f"{mode}-{world}.json")
                if os.path.exists(out):
                    os.unlink(out)
                _run(["hvdkit.bench.train_worker", mode, out, str(steps), str(batch)], np=world, timeout=timeout,
                     result=out)
                with open(out) as f:
                    runs[(mode, world)].append(json.load(f)["samples_per_sec"])
    results = {mode: {str(w): {"best": max(runs[(mode, w)]), "min": min(runs[(mode, w)]), "runs": runs[(mode, w)]}
                      for w in workers} for mode in modes}
    ratios = {}
    for family in (TORCH_MODES, KERAS_MODES):
        present = [m for m in family if m in results]
        for ours in (m for m in present if m.startswith("hvdkit")):
            for other in (m for m in present if not m.startswith("hvdkit")):
                for w in map(str, workers):
                    ratios[f"{ours} / {other} @{w}"] = results[ours][w]["best"] / results[other][w]["best"]
    scaling = {m: results[m][str(max(workers))]["best"] / (max(workers) * results[m][str(min(workers))]["best"])
               for m in modes if len(workers) > 1}
    report = {"steps": steps, "batch_per_worker": batch, "repeats": repeats, "workers": workers,
              "results": results, "ratios": ratios, "scaling_efficiency": scaling}
    _write(out_dir, "train", report, _train_markdown(report), _train_plot)
    return report


def _train_markdown(r: Dict) -> str:
    ws = r["workers"]
    lines = ["| mode | " + " | ".join(f"{w} worker(s), samples/s (best, spread)" for w in ws) + " | scaling |",
             "|---|" + "---|" * (len(ws) + 1)]
    for mode, by_w in r["results"].items():
        cells = [f"{by_w[str(w)]['best']:.0f} ({by_w[str(w)]['min']:.0f}-{by_w[str(w)]['best']:.0f})" for w in ws]
        eff = r["scaling_efficiency"].get(mode)
        lines.append(f"| {mode} | " + " | ".join(cells) + (f" | {eff:.2f} |" if eff is not None else " | - |"))
    lines.append("")
    lines.append(f"Batch {r['batch_per_worker']} per worker, {r['steps']} timed steps after as many warm-up steps, "
                 f"best of {r['repeats']} interleaved runs. Ratios (best vs best):")
    lines += [f"- {k}: {v:.2f}x" for k, v in r["ratios"].items()]
    return "\n".join(lines) + "\n"


def _train_plot(r: Dict, ax) -> None:
    modes, ws = list(r["results"]), r["workers"]
    width = 0.8 / len(ws)
    for j, w in enumerate(ws):
        ax.bar([i + j * width for i in range(len(modes))], [r["results"][m][str(w)]["best"] for m in modes],
               width, label=f"{w} worker(s)")
    ax.set_xticks([i + width * (len(ws) - 1) / 2 for i in range(len(modes))])
    ax.set_xticklabels(modes, rotation=20, fontsize=8)
    ax.set_ylabel("samples/s (best)")
    ax.set_title(f"small CNN, batch {r['batch_per_worker']} per worker")
    ax.legend(fontsize=8)


def _write(out_dir: str, name: str, report: Dict, markdown: str, plot) -> None:
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
def _clean_env() -> Dict[str, str]:
    """This process's environment as it is now (a copy), without a launcher's per-job variables: what every row
    of ``bench zero`` starts from, so no row sees another's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(JOB_ENV_PREFIXES)}


def _run_row(args: Sequence[str], np: int, base_env: Dict[str, str], result: str, timeout: float) -> None:
    """One row: ``python -m args`` on ``np`` fresh workers under horovodrun (Gloo), with a fresh copy of
    ``base_env`` plus one compute thread and a free-looking port; a failure before ``result`` exists is tried once
    more (on another port). The launcher's process group is killed on a timeout."""
    for attempt in (1, 2):
        env = dict(base_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONWARNINGS="ignore", HVDKIT_BENCH_PORT=str(random.randint(20000, 40000)))
        cmd = launch_command(["-m", *args], np=np, launcher="horovodrun")
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


def bench_zero(out_dir: str, workers: List[int], rounds: int = 3, steps: int = 20, batch: int = 32,
               model: str = "mlp", width: int = 1024, depth: int = 4, variants: Sequence[str] = ZERO_VARIANTS,
               timeout: float = 900) -> Dict:
    """Adam's state held per rank, gradients held per rank, peak RSS per rank and samples/s of each variant (see
    ``hvdkit.bench.zero_worker``) at each worker count. Each (variant, workers) row runs in new processes with a
    fresh copy of one environment; every round runs every row (rows interleaved, the order rotated each round);
    each figure is the median over rounds of its largest value over ranks."""
    os.makedirs(out_dir, exist_ok=True)
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
    _write(out_dir, "zero", report, _zero_markdown(report), _zero_plot)
    return report


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f}"


def _zero_markdown(r: Dict) -> str:
    lines = ["| variant | workers | optimizer state / rank (MiB) | grads after step / rank (MiB) | "
             "grads at the step / rank (MiB) | peak RSS / rank (MiB) | samples/s (median, range) |",
             "|---|---|---|---|---|---|---|"]
    for world in r["workers"]:
        for variant in r["variants"]:
            row = r["results"][variant][str(world)]
            lines.append(f"| {variant} | {world} | {_mib(row['state_bytes'])} | {_mib(row['grad_bytes_after_step'])} | "
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hvdkit bench")
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("allreduce", help="allreduce bus bandwidth vs message size, 2 ranks")
    a.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="bytes, comma separated")
    a.add_argument("--iters", type=int, default=20)
    a.add_argument("--out", default="results/bench")
    t = sub.add_parser("train", help="training samples/s at 1 and 2 workers against the peers")
    t.add_argument("--modes", default=",".join(TORCH_MODES + KERAS_MODES))
    t.add_argument("--workers", default="1,2")
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--out", default="results/bench")
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
        bench_allreduce(args.out, [int(s) for s in args.sizes.split(",")], args.iters)
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
        modes = args.modes.split(",")
        unknown = set(modes) - set(TORCH_MODES + KERAS_MODES)
        if unknown:
            raise HvdkitError(f"unknown bench modes {sorted(unknown)}; choose from {', '.join(TORCH_MODES + KERAS_MODES)}")
        bench_train(args.out, modes, [int(w) for w in args.workers.split(",")], args.steps, args.batch, args.repeats)
    print(f"bench: done in {time.time() - started:.0f} s", file=sys.stderr)
    return 0
