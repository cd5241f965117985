"""`hvdkit bench` at its smallest sizes, a few rows each: the commands run, write table, JSON and PNG, and every row
ran in a fresh environment with what it asked for, as its workers read it back (threads, Horovod's controller and
tensor operations). The caller's environment is polluted on purpose (Gloo ops, 2 threads, legacy Keras): no row may
see it. The report's arithmetic (medians, ranges, per-round ratios, scaling, read-back mismatches) is checked on
made-up worker outputs, without processes. No timing asserts beyond numbers > 0."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from proc import REPO, explain, run

from hvdkit.bench import run as bench_run

# what a careless shell might hold; the bench must build each row's environment without it
POLLUTED = {"HOROVOD_CPU_OPERATIONS": "gloo", "OMP_NUM_THREADS": "2", "HVDKIT_THREADS": "2", "TF_USE_LEGACY_KERAS": "1"}


def bench(*args, timeout=300):
    return run([sys.executable, "-m", "hvdkit.cli", "bench", *args], timeout=timeout, cwd=REPO, env=POLLUTED)


def collectives(ran):
    c = ran["collectives"]
    return (c["controller"], c["cpu_ops"]) if "controller" in c else c["backend"]


def test_each_row_env_is_built_from_a_clean_base(monkeypatch):
    for key, value in {**POLLUTED, "OMPI_COMM_WORLD_RANK": "3", "HOROVOD_RANK": "1", "TF_CONFIG": "{}",
                       "HVDKIT_BENCH_KEEP_ME": "yes"}.items():
        monkeypatch.setenv(key, value)
    base = bench_run._clean_env()
    assert not [k for k in base if k.startswith(("HOROVOD_", "OMPI_", "OMP_", "TF_"))] and "HVDKIT_THREADS" not in base
    assert base["HVDKIT_BENCH_KEEP_ME"] == "yes" and base["PATH"] == os.environ["PATH"]
    snapshot = dict(base)
    mpi = bench_run._row_env(base, {"HOROVOD_CPU_OPERATIONS": "mpi"})
    gloo = bench_run._row_env(base, {"HOROVOD_CPU_OPERATIONS": "gloo"})
    default = bench_run._row_env(base)
    assert (mpi["HOROVOD_CPU_OPERATIONS"], gloo["HOROVOD_CPU_OPERATIONS"]) == ("mpi", "gloo")
    assert "HOROVOD_CPU_OPERATIONS" not in default and base == snapshot    # nothing carried from row to row
    for env in (mpi, gloo, default):
        assert (env["OMP_NUM_THREADS"], env["HVDKIT_THREADS"]) == ("1", "1")


def test_allreduce_bench_smallest_size(tmp_path):
    # MPI ops, then Gloo ops, then the kit's default (which must read back MPI again), then mpi4py
    impls = ["horovod mpi ops", "horovod gloo ops", "hvdkit (mpirun)", "mpi4py"]
    result = bench("allreduce", "--sizes", "4096", "--iters", "2", "--rounds", "1", "--impls", ",".join(impls),
                   "--probe-ops", "--out", str(tmp_path))     # the ops also as Horovod's timeline shows them
    assert result.returncode == 0, explain(result)
    ran_order = [line.split("allreduce ", 1)[1].split(" under")[0] for line in result.stderr.splitlines()
                 if line.startswith("[bench ")]
    assert ran_order == impls, result.stderr
    report = json.loads((tmp_path / "allreduce.json").read_text())
    assert list(report["results"]) == impls and report["mismatches"] == []
    assert all(v["4096"]["busbw_GBps"] > 0 for v in report["results"].values()) and report["memcpy_GBps"] > 0
    ran = {impl: row["ran_with"][0] for impl, row in report["rows"].items()}
    assert collectives(ran["horovod mpi ops"]) == ("mpi", "mpi")
    assert collectives(ran["horovod gloo ops"]) == ("gloo", "gloo")     # the row before asked for MPI
    assert collectives(ran["hvdkit (mpirun)"]) == ("mpi", "mpi")        # the row before asked for Gloo, the shell too
    assert collectives(ran["mpi4py"]).startswith("MPI")
    for impl in impls[:3]:
        assert (ran[impl]["threads"]["intra_op"], ran[impl]["threads"]["inter_op"]) == (1, 1), (impl, ran[impl])
        assert ran[impl]["collectives"]["cpu_ops_timeline"] == ran[impl]["collectives"]["cpu_ops"], (impl, ran[impl])
    assert report["rows"]["horovod gloo ops"]["asked"] == {"HOROVOD_CPU_OPERATIONS": "gloo"}
    assert report["rows"]["hvdkit (mpirun)"]["asked"] == {}
    assert report["ratios_at_max"]["hvdkit (mpirun) / mpi4py"]["median"] > 0
    md = (tmp_path / "allreduce.md").read_text()
    assert "| 4 KiB |" in md
    assert "| horovod gloo ops | horovodrun | HOROVOD_CPU_OPERATIONS=gloo | torch 1/1 | Horovod: gloo controller, " \
           "gloo ops (timeline: gloo) |" in md
    assert (tmp_path / "allreduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_bench_smallest_size(tmp_path):
    # the kit's two frameworks: torch under horovodrun's MPI controller (what `hvdkit launch` starts for a static job;
    # Gloo's read-back is the allreduce smoke's; mpirun's is the Keras row's), Keras under mpirun; the baselines'
    # arithmetic: below. The wide MLP (the CNN's builders are checked without processes) and one lever row: the kit's
    # torch worker with another cycle time, which Horovod's C++ side must see (the shell sets nothing of it), and
    # the other gradient reducer, which torch must show (hooks on the parameters, not Horovod's wrapper). At 2
    # workers only, for time: the kit's 1-worker step is bench overhead's (below) and a launched 1-worker job's is
    # tests/test_one_worker.py's; the scaling arithmetic is checked without processes
    # torch-nocomm (each rank alone, nothing averaged): the ceiling row runs, on one thread, with no collective
    modes = ["hvdkit-torch-horovodrun", "hvdkit-keras", "torch-nocomm"]
    result = bench("train", "--modes", ",".join(modes), "--steps", "2", "--batch", "8", "--rounds", "1",
                   "--workers", "2", "--model", "mlp",
                   "--variant", "hvdkit-torch-horovodrun:HOROVOD_CYCLE_TIME=5,HVDKIT_BENCH_REDUCER=buckets",
                   "--variant", "torch-nocomm:HVDKIT_BENCH_BIND=core",
                   "--out", str(tmp_path))
    assert result.returncode == 0, explain(result)
    assert not (tmp_path / "train.json").exists()    # the CNN's report name: an MLP run leaves it alone
    report = json.loads((tmp_path / "train-mlp.json").read_text())
    lever = "hvdkit-torch-horovodrun HOROVOD_CYCLE_TIME=5 HVDKIT_BENCH_REDUCER=buckets"
    bound = "torch-nocomm HVDKIT_BENCH_BIND=core"
    assert list(report["results"]) == modes + [lever, bound] and report["mismatches"] == [], report["mismatches"]
    assert report["model"] == "mlp"
    modes = [m for m in modes if m != "torch-nocomm"] + [lever]   # the rows that average, checked alike below
    assert report["variants"] == {lever: {"HOROVOD_CYCLE_TIME": "5", "HVDKIT_BENCH_REDUCER": "buckets"},
                                  bound: {"HVDKIT_BENCH_BIND": "core"}}
    # the binding lever: mpirun --bind-to core puts rank 0 on one CPU, read back from the kernel; the kit's
    # --bind-to none leaves it every CPU this test may use
    assert len(report["results"].pop(bound)["2"]["ran_with"][0]["cpus_allowed"]) == 1
    assert report["results"]["torch-nocomm"]["2"]["ran_with"][0]["cpus_allowed"] == sorted(os.sched_getaffinity(0))
    assert "| CPUs allowed |" in (tmp_path / "train-mlp.md").read_text()
    lever_knobs = report["results"][lever]["2"]["ran_with"][0]["collectives"]["knobs"]
    assert lever_knobs["HOROVOD_CYCLE_TIME"] == "5"
    assert lever_knobs["HVDKIT_BENCH_REDUCER"] == "buckets", lever_knobs   # the reducer, read back from torch
    assert report["results"]["hvdkit-torch-horovodrun"]["2"]["ran_with"][0]["collectives"]["knobs"] == {
        "HOROVOD_CYCLE_TIME": "2", "HOROVOD_FUSION_THRESHOLD": "4194304", "HOROVOD_CACHE_CAPACITY": None,
        "OMPI_MCA_mpi_yield_when_idle": "1",     # the kit's defaults (hvdkit/tuning.py)
        "HVDKIT_BENCH_REDUCER": "horovod"}
    assert report["ratios"][f"{lever} / hvdkit-torch-horovodrun @2"]["median"] > 0
    nocomm = report["results"].pop("torch-nocomm")["2"]
    assert nocomm["median"] > 0 and nocomm["ran_with"][0]["collectives"] == {"backend": "none (each rank alone; 2 ranks)"}
    assert (nocomm["ran_with"][0]["threads"]["intra_op"], nocomm["ran_with"][0]["threads"]["inter_op"]) == (1, 1)
    assert report["ratios"]["hvdkit-torch-horovodrun / torch-nocomm @2"]["median"] > 0
    for mode, by_workers in report["results"].items():
        assert set(by_workers) == {"2"}, mode
        for world, row in by_workers.items():
            assert row["median"] > 0 and len(row["runs"]) == 1, (mode, world)
            ran = row["ran_with"][0]
            threads = ran["threads"]
            assert threads["framework"] == ("tensorflow" if "keras" in mode else "torch"), (mode, ran)
            assert (threads["intra_op"], threads["inter_op"]) == (1, 1), (mode, world, ran)   # the shell said 2
            assert ran["busy_threads"] >= 1 and ran["cpu_cores_used"] > 0, (mode, world, ran)
            assert collectives(ran) == ("mpi", "mpi"), (mode, world, ran)     # the shell said Gloo ops
            assert ran["collectives"]["cpu_ops_from"].startswith("Horovod's default"), (mode, world, ran)
            assert "cpu_ops_timeline" not in ran["collectives"], (mode, world, ran)   # no timeline while measuring
    md = (tmp_path / "train-mlp.md").read_text()
    assert "| hvdkit-torch-horovodrun |" in md and "wide MLP (784-2048-2048-10" in md
    assert report["launcher"] == {"hvdkit-torch-horovodrun": "horovodrun --mpi", "hvdkit-keras": "mpirun",
                                  "torch-nocomm": "mpirun", lever: "horovodrun --mpi", bound: "mpirun"}
    assert f"horovodrun --mpi: hvdkit-torch-horovodrun, {lever}" in md and "mpirun: hvdkit-keras, torch-nocomm" in md
    assert "| torch-nocomm | 2 | torch 1/1 |" in md and "| none (each rank alone; 2 ranks) |" in md
    assert "; buckets reducer |" in md and "; horovod reducer |" in md
    assert "| hvdkit-keras | 2 | TF 1/1 |" in md
    # what it was measured on: this checkout's commit and the Horovod wheel pip installed, named after the build
    # key mpi/setup.sh derives from mpi/patch_horovod.py
    made = report["provenance"]
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          timeout=30)
    assert made["commit"].split("+")[0] == head.stdout.strip(), made
    patch = open(os.path.join(REPO, "mpi", "patch_horovod.py"), "rb").read()
    assert made["horovod_build"].endswith("-" + hashlib.sha256(patch).hexdigest()[:12]), \
        f"{made['horovod_build']}: not built from this checkout's mpi/patch_horovod.py; run mpi/setup.sh"
    assert made["versions"]["horovod"] == "0.28.1" and made["versions"]["hvdkit"], made
    assert made["cores"] == len(os.sched_getaffinity(0)), made
    assert len(made["load_average"]) == len(made["load_average_end"]) == 3 and bench_run.provenance_line(made) in md
    assert (tmp_path / "train-mlp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_bench_smallest_size(tmp_path):
    # both frameworks' kit and plain rows taking turns in one process each, with one compute thread (the shell said 2)
    from hvdkit.bench.overhead_worker import ROWS
    result = bench("overhead", "--models", "cnn", "--steps", "2", "--batch", "8", "--rounds", "2",
                   "--out", str(tmp_path))
    assert result.returncode == 0, explain(result)
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert [(c["framework"], c["model"]) for c in report["cases"]] == [("torch", "cnn"), ("keras", "cnn")]
    assert report["mismatches"] == []
    for case in report["cases"]:
        assert list(case["rows"]) == ROWS[case["framework"]]
        for name, row in case["rows"].items():
            assert len(row["runs"]) == 2 and row["min"] > 0, (case["framework"], name)
            assert case["samples"][name] == [2 * 8, 2 * 8], (case["framework"], name)   # like for like: same work
            assert [(t["intra_op"], t["inter_op"]) for t in case["threads"][name]] == [(1, 1)] * 2, name
        threads = case["ran_with"]["threads"]
        assert (threads["intra_op"], threads["inter_op"]) == (1, 1) and case["ran_with"]["busy_threads"] >= 1
    keras_case = report["cases"][1]
    fit, plain_fit = keras_case["rows"]["hvdkit-fit"]["runs"], keras_case["rows"]["plain-fit"]["runs"]
    assert keras_case["ratios"]["hvdkit-fit / plain-fit"]["runs"] == [a / b for a, b in zip(fit, plain_fit)]
    md = (tmp_path / "overhead.md").read_text()
    assert "**torch, cnn**" in md and "| plain-fit |" in md and "- hvdkit / plain: " in md
    assert (tmp_path / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_report_ratios_per_round_the_target_and_threads():
    from hvdkit.bench.overhead import overhead_markdown, overhead_report
    found = [{"framework": "torch", "model": "mlp", "steps": 2, "batch": 8, "rounds": 2, "ran_with": _ran(threads=2),
              "rows": {"hvdkit": [90, 180], "hvdkit-guard-off": [100, 200], "plain": [100, 190]}}]
    r = overhead_report(found)
    ratios = r["cases"][0]["ratios"]
    kit = ratios["hvdkit / plain"]          # per round 0.9 and 180/190
    assert (round(kit["min"], 6), round(kit["max"], 6)) == (0.9, round(180 / 190, 6))
    assert round(kit["median"], 6) == round((0.9 + 180 / 190) / 2, 6)
    assert ratios["hvdkit / hvdkit-guard-off"]["runs"] == [0.9, 0.9]
    assert r["cases"][0]["met"] == {"hvdkit / plain": False}   # the target's ratio; the others are diagnostic
    assert r["mismatches"] == ["torch mlp: torch ran 2/2 intra/inter-op threads, asked 1"]
    md = overhead_markdown(r)
    assert "- hvdkit / plain: 0.924 (0.900-0.947)x (NOT met: target >= 0.97)" in md
    assert "- hvdkit-guard-off / plain: 1.026 (1.000-1.053)x\n" in md
    assert "| hvdkit | 135 (90-180) |" in md and "- torch mlp: torch ran 2/2" in md
    # read back per row and turn: one row on 2 threads is named; rows that trained different samples are flagged
    one = {"framework": "torch", "intra_op": 1, "inter_op": 1}
    found[0].update(ran_with=_ran(), threads={"hvdkit": [one, one], "plain": [one, dict(one, intra_op=2)]},
                    samples={"hvdkit": [16, 16], "hvdkit-guard-off": [16, 16], "plain": [16, 8]})
    assert overhead_report(found)["mismatches"] == [
        "torch mlp plain: torch ran 2/1 intra/inter-op threads, asked 1",
        "torch mlp: the rows trained different sample counts per turn "
        "{'hvdkit': [16, 16], 'hvdkit-guard-off': [16, 16], 'plain': [16, 8]}"]


def test_a_lever_of_a_mode_not_benched_is_one_line(tmp_path):
    result = bench("train", "--modes", "torch-ddp", "--variant", "hvdkit-torch:HOROVOD_CYCLE_TIME=5",
                   "--out", str(tmp_path), timeout=60)
    assert result.returncode == 2 and result.stdout == "", explain(result)
    assert result.stderr.strip() == ("hvdkit: error: --variant of hvdkit-torch, which --modes leaves out: its lever "
                                     "would have no row to compare with; add hvdkit-torch to --modes")
    assert list(tmp_path.iterdir()) == []


def test_a_binding_lever_on_a_row_not_under_mpirun_is_one_line(tmp_path):
    # horovodrun starts its own mpirun with --bind-to none (or no mpirun at all, under Gloo): nothing to bind
    result = bench("train", "--modes", "hvdkit-torch-horovodrun", "--variant",
                   "hvdkit-torch-horovodrun:HVDKIT_BENCH_BIND=core", "--out", str(tmp_path), timeout=60)
    assert result.returncode == 2 and result.stdout == "", explain(result)
    line = result.stderr.strip()
    assert "\n" not in line and "HVDKIT_BENCH_BIND binds the ranks of a mode run under mpirun, not " \
        "hvdkit-torch-horovodrun" in line, line
    assert list(tmp_path.iterdir()) == []


def _ran(framework="torch", threads=1, backend=None, controller="mpi", ops="mpi"):
    return {"threads": {"framework": framework, "intra_op": threads, "inter_op": threads}, "busy_threads": 1,
            "cpu_cores_used": 1.0, "collectives": {"backend": backend} if backend else
            {"controller": controller, "cpu_ops": ops}}


def test_train_report_medians_ratios_scaling_and_mismatches():
    speeds = {("hvdkit-torch", 1): [100, 120, 110], ("torch-ddp", 1): [100, 100, 110],
              ("hvdkit-torch", 2): [180, 180, 200], ("torch-ddp", 2): [200, 150, 200],
              ("hvdkit-keras", 1): [50, 50, 50], ("hvdkit-keras", 2): [90, 90, 90],
              ("torch-nocomm", 1): [120, 120, 120], ("torch-nocomm", 2): [220, 200, 180]}
    ran = {"hvdkit-torch": _ran(), "torch-ddp": _ran(backend="torch.distributed gloo"),
           "torch-nocomm": _ran(backend="none (each rank alone; 2 ranks)"),
           "hvdkit-keras": _ran("tensorflow", threads=0, ops="gloo")}     # TF on every core, Gloo ops: not asked
    found = {row: [{"samples_per_sec": v, "ran_with": ran[row[0]]} for v in runs] for row, runs in speeds.items()}
    r = bench_run._train_report(found, [1, 2], steps=2, batch=8, rounds=3)
    torch1 = r["results"]["hvdkit-torch"]["1"]
    assert (torch1["median"], torch1["min"], torch1["max"]) == (110, 100, 120)
    ratio = r["ratios"]["hvdkit-torch / torch-ddp @2"]       # per round: 0.9, 1.2, 1.0
    assert (round(ratio["median"], 6), round(ratio["min"], 6), round(ratio["max"], 6)) == (1.0, 0.9, 1.2)
    # the ceiling (each rank alone) against DDP, per round 1.1, 1.333, 0.9; the kit against the ceiling; and not
    # the other way round (a baseline over the ceiling says nothing more)
    ceiling = r["ratios"]["torch-nocomm / torch-ddp @2"]
    assert [round(v, 3) for v in ceiling["runs"]] == [1.1, 1.333, 0.9] and round(ceiling["median"], 6) == 1.1
    assert [round(v, 3) for v in r["ratios"]["hvdkit-torch / torch-nocomm @2"]["runs"]] == [0.818, 0.9, 1.111]
    assert "torch-ddp / torch-nocomm @2" not in r["ratios"] and "hvdkit-keras / torch-nocomm @2" not in r["ratios"]
    scaling = r["scaling_efficiency"]["hvdkit-torch"]["2"]   # per round: 180/200, 180/240, 200/220
    assert round(scaling["median"], 6) == round(180 / 200, 6) and round(scaling["min"], 6) == 0.75
    assert r["scaling_efficiency"]["hvdkit-keras"]["2"]["median"] == 0.9
    assert sorted(r["mismatches"]) == sorted(
        [f"hvdkit-keras @{w}: tensorflow ran 0/0 intra/inter-op threads, asked 1" for w in (1, 2)]
        + [f"hvdkit-keras @{w}: Horovod cpu_ops gloo, asked mpi" for w in (1, 2)])
    md = bench_run._train_markdown(r)
    assert "| hvdkit-torch | 110 (100-120) | 180 (180-200) | 0.90 (0.75-0.91) |" in md
    assert "- hvdkit-torch / torch-ddp @2: 1.00x (0.90-1.20)" in md
    assert "| torch-ddp | 1 | torch 1/1 | 1 | 1.00 | - | torch.distributed gloo |" in md
    assert "**Read back differs from what the row asked:**" in md and "- hvdkit-keras @1: Horovod cpu_ops gloo" in md


def test_train_report_compares_a_lever_row_with_its_mode_and_checks_its_settings():
    lever = "hvdkit-torch HOROVOD_CACHE_CAPACITY=0"
    knobs = {lever: {"HOROVOD_CACHE_CAPACITY": "0"}, "hvdkit-torch": {"HOROVOD_CACHE_CAPACITY": None}}
    speeds = {("hvdkit-torch", 2): [100, 200], (lever, 2): [90, 240]}
    found = {row: [{"samples_per_sec": v, "ran_with": {**_ran(), "collectives": {
        "controller": "mpi", "cpu_ops": "mpi", "knobs": knobs[row[0]]}}} for v in runs] for row, runs in speeds.items()}
    variants = {lever: ("hvdkit-torch", {"HOROVOD_CACHE_CAPACITY": "0"})}
    r = bench_run._train_report(found, [2], steps=2, batch=8, rounds=2, variants=variants)
    ratio = r["ratios"][f"{lever} / hvdkit-torch @2"]     # per round: 0.9, 1.2
    assert (round(ratio["min"], 6), round(ratio["max"], 6)) == (0.9, 1.2) and r["mismatches"] == []
    knobs[lever]["HOROVOD_CACHE_CAPACITY"] = "1024"   # Horovod saw something else: flagged
    r = bench_run._train_report(found, [2], steps=2, batch=8, rounds=2, variants=variants)
    assert r["mismatches"] == [f"{lever} @2: HOROVOD_CACHE_CAPACITY=1024, asked 0"]
    # a binding lever whose rank 0 could still run on every CPU this process may (the binding did not take): flagged
    bound = "torch-nocomm HVDKIT_BENCH_BIND=core"
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: on one, a bound rank and an unbound one look alike")
    every = sorted(os.sched_getaffinity(0))
    found = {row: [{"samples_per_sec": 100, "ran_with": {**_ran(backend="none"), "cpus_allowed": every}}]
             for row in (("torch-nocomm", 2), (bound, 2))}
    variants = {bound: ("torch-nocomm", {"HVDKIT_BENCH_BIND": "core"})}
    r = bench_run._train_report(found, [2], steps=2, batch=8, rounds=1, variants=variants)
    assert r["mismatches"] == [f"{bound} @2: rank 0 may run on CPUs {bench_run._cpu_text(every)}, every CPU the bench "
                               "may use, asked HVDKIT_BENCH_BIND=core"]
    found[(bound, 2)][0]["ran_with"]["cpus_allowed"] = every[1:2]
    r = bench_run._train_report(found, [2], steps=2, batch=8, rounds=1, variants=variants)
    row = f"| torch-nocomm HVDKIT_BENCH_BIND=core | 2 | torch 1/1 | 1 | 1.00 | {every[1]} |"
    assert r["mismatches"] == [] and row in bench_run._train_markdown(r)


def test_both_bench_models_have_the_advertised_size_in_both_frameworks():
    import keras
    from hvdkit.bench.models import TRAIN_MODELS
    sizes = {}
    for name, (torch_model, keras_model) in TRAIN_MODELS.items():
        sizes[name] = (sum(p.numel() for p in torch_model().parameters()), keras_model(keras).count_params())
    assert sizes["mlp"] == (784 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 10 + 10,) * 2
    assert sizes["cnn"][0] == sizes["cnn"][1] and sizes["cnn"][0] == 206922
    assert round(sizes["mlp"][0] / 1e6, 1) == 5.8


def test_allreduce_report_bandwidth_ratios_and_mismatches():
    size = 1 << 20
    seconds = {"mpi4py": [0.001, 0.002], "horovod mpi ops": [0.002, 0.002], "hvdkit (mpirun)": [0.002, 0.004]}
    timeline_disagrees = _ran()
    timeline_disagrees["collectives"]["cpu_ops_timeline"] = "gloo"
    ran = {"mpi4py": {"threads": None, "collectives": {"backend": "MPI (Open MPI v4.1.4)"}},
           "horovod mpi ops": timeline_disagrees, "hvdkit (mpirun)": _ran(controller="mpi", ops="gloo")}
    found = {impl: [{"world_size": 2, "results": {str(size): t}, "ran_with": ran[impl],
                     "memcpy_seconds": 0.0005 if impl == "mpi4py" else None} for t in runs]
             for impl, runs in seconds.items()}
    r = bench_run._allreduce_report(found, [size], iters=5, rounds=2)
    mpi4py = r["results"]["mpi4py"][size]      # bus bandwidth = bytes / s * 2 (n - 1) / n = bytes / s at 2 ranks
    assert (mpi4py["busbw_GBps_min"], mpi4py["busbw_GBps_max"]) == (size / 0.002 / 1e9, size / 0.001 / 1e9)
    assert r["memcpy_GBps"] == size / 0.0005 / 1e9
    ratio = r["ratios_at_max"]["hvdkit (mpirun) / horovod mpi ops"]    # per round: 1.0, 0.5
    assert (ratio["min"], ratio["max"]) == (0.5, 1.0)
    assert r["mismatches"] == ["horovod mpi ops: Horovod cpu_ops_timeline gloo, asked mpi",
                               "hvdkit (mpirun): Horovod cpu_ops gloo, asked mpi"]
    md = bench_run._allreduce_markdown(r)
    assert "| mpi4py | mpirun | (nothing) | - | MPI (Open MPI v4.1.4) |" in md
    assert "| hvdkit (mpirun) | mpirun | (nothing) | torch 1/1 | Horovod: mpi controller, gloo ops |" in md
    assert "**Read back differs from what the row asked:**" in md


def test_combine_gives_each_ratio_per_run_and_the_spread_over_runs(tmp_path):
    def report(ours, ddp, model="cnn"):
        found = {("hvdkit-torch", 2): [{"samples_per_sec": v, "ran_with": _ran()} for v in ours],
                 ("torch-ddp", 2): [{"samples_per_sec": v, "ran_with": _ran(backend="torch.distributed gloo")}
                                    for v in ddp]}
        return dict(bench_run._train_report(found, [2], steps=2, batch=8, rounds=len(ours)), model=model)
    runs = [report([110, 120, 130], [100, 100, 100]),     # per-round ratios 1.1, 1.2, 1.3: median 1.2
            report([90, 100, 95], [100, 100, 100]),       # median 0.95
            report([100, 105, 99], [100, 100, 100])]      # median 1.0
    for i, r in enumerate(runs):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "train.json").write_text(json.dumps(r))
    c = bench_run.bench_combine(str(tmp_path / "out"), [str(tmp_path / f"r{i}") for i in range(3)])
    ratio = c["ratios"]["hvdkit-torch / torch-ddp @2"]
    assert [round(x, 6) for x in ratio["runs"]] == [1.2, 0.95, 1.0] and round(ratio["median"], 6) == 1.0
    assert (round(ratio["min"], 6), round(ratio["max"], 6)) == (0.95, 1.2)
    assert c["samples_per_sec"]["hvdkit-torch @2"]["runs"] == [120, 95, 100]
    md = (tmp_path / "out" / "train-runs.md").read_text()
    assert "| hvdkit-torch / torch-ddp @2 | 1.20x | 0.95x | 1.00x | 1.00x (0.95x-1.20x) |" in md
    assert "Measured on" not in md     # reports from before reports carried their provenance: no footer
    made = {"commit": "abc", "horovod_build": "horovod-x-k1",
            "versions": {"hvdkit": "0.1.0", "horovod": "0.28.1", "torch": None}, "python": "3.11.7", "cores": 2,
            "load_average": [0.5, 1.0, 1.25], "load_average_end": [1.5, 2.0, 2.25], "started": "2026-11-29 17:00 UTC"}
    runs[1]["provenance"] = made
    (tmp_path / "r1" / "train.json").write_text(json.dumps(runs[1]))
    bench_run.bench_combine(str(tmp_path / "out"), [str(tmp_path / f"r{i}") for i in range(3)])
    md = (tmp_path / "out" / "train-runs.md").read_text()
    assert ("- run 2: Measured on hvdkit abc, Horovod build horovod-x-k1; horovod 0.28.1; Python 3.11.7; 2 cores; "
            "load average (1/5/15 min) 0.5/1/1.25 at the start, 1.5/2/2.25 at the end; started 2026-11-29 17:00 UTC."
            ) in md, md
    assert json.loads((tmp_path / "out" / "train-runs.json").read_text())["run_provenance"] == [None, made, None]
    (tmp_path / "r2" / "train.json").write_text(json.dumps(report([1], [1], model="mlp")))
    with pytest.raises(bench_run.HvdkitError, match=r"different models \(cnn, mlp\)"):
        bench_run.bench_combine(str(tmp_path / "out"), [str(tmp_path / f"r{i}") for i in range(3)])


def test_provenance_names_the_checkout_only_when_the_kit_is_one(tmp_path, monkeypatch):
    """Commit and "+dirty" (code only, not docs/bench's copies of reports) from the kit's own checkout; None when the
    kit sits in another project's tree or outside git; the Horovod build from pip's record, else None."""
    from hvdkit.bench import provenance as prov

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, timeout=30)
    kit = tmp_path / "kit"
    (kit / "hvdkit").mkdir(parents=True)
    (kit / "docs").mkdir()
    (kit / "hvdkit" / "a.py").write_text("x = 1\n")
    (kit / "docs" / "t.md").write_text("table\n")
    monkeypatch.setattr(prov, "_KIT_ROOT", str(kit))
    assert prov._commit() is None                         # not in git at all
    git("init", "-q", str(kit))
    git("-C", str(kit), "add", "-A")
    git("-C", str(kit), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "1")
    head = subprocess.run(["git", "-C", str(kit), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, timeout=30).stdout.strip()
    assert prov._commit() == head
    (kit / "docs" / "t.md").write_text("a newer table\n")
    assert prov._commit() == head                         # reports copied into docs/ leave the code clean
    (kit / "hvdkit" / "a.py").write_text("x = 2\n")
    assert prov._commit() == head + "+dirty"
    monkeypatch.setattr(prov, "_KIT_ROOT", str(kit / "hvdkit"))   # installed inside another project's checkout
    assert prov._commit() is None

    class Dist:
        def __init__(self, text):
            self.text = text

        def read_text(self, name):
            return self.text
    for text, build in [(json.dumps({"url": "file:///c/wheels/horovod-0.28.1-py3.11-abc123/horovod-0.28.1-cp311.whl"}),
                         "horovod-0.28.1-py3.11-abc123"),
                        (json.dumps({"url": "file:///tmp/horovod-0.28.1-cp311.whl"}), "horovod-0.28.1-cp311.whl"),
                        (json.dumps({"url": "https://github.com/horovod/horovod", "vcs_info": {}}), None),
                        (None, None), ("{not json", None), ("[]", None)]:
        monkeypatch.setattr(prov.metadata, "distribution", lambda name, t=text: Dist(t))
        assert prov._horovod_build() == build, text
    monkeypatch.undo()
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          timeout=30)
    assert os.path.realpath(prov._KIT_ROOT) == os.path.realpath(REPO) and prov._commit().startswith(head.stdout.strip())
    made = prov.provenance()
    line = prov.provenance_line(prov.finished(dict(made, commit=None, horovod_build=None)))
    assert line.startswith(f"Measured on hvdkit {made['versions']['hvdkit']}, Horovod build (unknown); "), line
