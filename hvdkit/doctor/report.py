"""The doctor's report: gather facts and probes, judge them, print text or JSON.

Example::

    >>> report = collect()                  # the dict ``hvdkit doctor --json`` prints
    >>> report["ok"], report["problems"]
    (True, [])
    >>> print(format_report(report).splitlines()[-1])
    doctor: OK
"""
from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any, Dict, List, Tuple

from .. import __version__
from .checks import (Findings, check_cpu, check_horovod, check_horovodrun, check_keras, check_mpi4py,
                     check_mpirun, check_network)
from .facts import cpu_facts, launcher_facts, memory_facts, network_facts, package_version
from .probes import run_probes

Rows = List[Tuple[str, str]]
PACKAGES = ("horovod", "torch", "tensorflow", "keras", "mpi4py")


def collect() -> Dict[str, Any]:
    """Gather every fact and judge it; returns the dict that ``--json`` prints."""
    start = time.monotonic()
    launchers = launcher_facts()
    packages = {name: package_version(name) for name in PACKAGES}
    results = run_probes(launchers)
    found = Findings()
    # The checks run in report order: problems and warnings are listed as they are found.
    horovod = check_horovod(results, packages["horovod"], found)
    check_horovodrun(launchers, found)
    mpi = check_mpirun(launchers["mpirun"], results.get("mpirun"), found)
    mpi4py = check_mpi4py(packages["mpi4py"], results["mpi4py"], mpi["implementation"], found)
    check_keras(packages["keras"], horovod["version"], found)
    cpu = cpu_facts()
    check_cpu(cpu, found)
    network = network_facts()
    check_network(network, found)
    return {"ok": not found.problems, "hvdkit": __version__,
            "python": {"version": platform.python_version(), "executable": sys.executable},
            "horovod": horovod, "mpi": mpi, "mpi4py": mpi4py,
            "packages": packages, "cpu": cpu, "memory": memory_facts(), "network": network,
            "launchers": launchers, "problems": found.problems, "warnings": found.warnings,
            "seconds": round(time.monotonic() - start, 1)}


def _checks(flags: Dict[str, bool]) -> str:
    return "  ".join(f"[{'X' if on else ' '}] {name}" for name, on in flags.items())


def _software_rows(r: Dict[str, Any]) -> Rows:
    """(label, value) rows for python, Horovod, the launchers, mpi4py and the frameworks."""
    h, mpi, m4, pk = r["horovod"], r["mpi"], r["mpi4py"], r["packages"]
    rows = [("python", f"{r['python']['version']}  {r['python']['executable']}")]
    if h["importable"]:
        rows += [("horovod", f"{h['version']}  {h['location']}"),
                 ("  frameworks", _checks(h["frameworks"])),
                 ("  controllers", _checks(h["controllers"])),
                 ("  tensor ops", _checks(h["tensor_operations"]))]
    else:
        rows.append(("horovod", f"NOT IMPORTABLE ({h['error']})"))
    rows += [("horovodrun", r["launchers"]["horovodrun"] or "not on PATH"
              + (f" (found {r['launchers']['horovodrun_beside_python']})"
                 if r["launchers"]["horovodrun_beside_python"] else "")),
             ("mpirun", f"{mpi['mpirun']}  ({mpi['implementation']} {mpi['version'] or ''})".rstrip()
              if mpi["mpirun"] else "not on PATH"),
             ("mpi4py", f"{m4['version']}  ({m4['library'].split(',')[0] if m4['library'] else '?'}, "
                        f"MPI {m4['mpi_standard']})" if m4["library"] else (m4["version"] or "not installed"))]
    return rows + [(name, pk[name] or "not installed") for name in ("torch", "tensorflow", "keras")]


def _machine_rows(r: Dict[str, Any]) -> Rows:
    """(label, value) rows for cores, memory, interfaces and the interface Gloo would use."""
    mem, net = r["memory"], r["network"]
    rows = [("cores", f"{r['cpu']['usable']} usable of {r['cpu']['count']}"),
            ("memory", f"{mem['total_gib']} GiB total, {mem['available_gib']} GiB available"
             if mem["total_gib"] else "unknown"),
            ("interfaces", "; ".join(f"{n} {', '.join(a) or '-'}" for n, a in sorted(net["interfaces"].items()))
             + f"  (from {net['source']})")]
    gloo = (f"HOROVOD_GLOO_IFACE={net['gloo_iface_env']}" if net["gloo_iface_env"]
            else f"single host: {net['single_host_iface'] or 'none'} (loopback)")
    if net["multi_host_candidates"]:
        gloo += f"; multi host: one of {', '.join(net['multi_host_candidates'])} (--network-interface)"
    return rows + [("gloo iface", gloo)]


def format_report(r: Dict[str, Any]) -> str:
    """The human report: aligned facts, then warnings, problems and the verdict line."""
    rows = _software_rows(r) + _machine_rows(r)
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"hvdkit doctor (hvdkit {r['hvdkit']}, {r['seconds']}s)"]
    lines += [f"  {k.ljust(width)}{v}" for k, v in rows]
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines += [f"problem: {p}" for p in r["problems"]]
    lines.append("doctor: OK" if r["ok"] else f"doctor: {len(r['problems'])} problem(s)")
    return "\n".join(lines)


def run_doctor(as_json: bool = False) -> int:
    """Print the preflight report (or one JSON object); return 0 when no problems, else 1."""
    report = collect()
    print(json.dumps(report, indent=2) if as_json else format_report(report), flush=True)
    return 0 if report["ok"] else 1
