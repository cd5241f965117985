"""``hvdkit doctor``: a preflight report to read before launching distributed jobs.

It tells what Horovod was built with (frameworks, controllers, tensor operations), which MPI,
mpi4py, torch, TensorFlow and Keras are installed, the cores, memory and network interfaces Gloo
would use, and whether ``horovodrun`` / ``mpirun`` are on the PATH. Every problem is one line
``problem: <what is wrong>; fix: <how to fix it>``; the exit code is 1 when there is any.

Example::

    $ hvdkit doctor            # readable report, last line "doctor: OK" or "doctor: N problem(s)"
    $ hvdkit doctor --json     # one JSON object with "ok", "problems" and "warnings"

    >>> from hvdkit.doctor import run_doctor
    >>> code = run_doctor(as_json=True)   # prints the report, returns 0 or 1

Nothing heavy is imported here: Horovod, torch and TensorFlow are imported only in child
processes (with a timeout), so a framework import that crashes or hangs becomes a reported
problem instead of killing the doctor.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from . import __version__

PROBE_TIMEOUT = 120  # seconds; a first TensorFlow import on a cold disk can take a minute
_MARK = "HVDKIT_PROBE_JSON "  # the probe's answer line; anything else the imports print is noise
# Drop the current directory from the child's sys.path: a Horovod source checkout in the cwd
# would otherwise shadow the installed (built) package, which user scripts never see.
_PRELUDE = "import json, sys\nif sys.path and sys.path[0] in ('', '.'): sys.path.pop(0)\n"

# `import horovod` is light (no framework); it says where the package is and which compiled
# extensions exist, the same files horovod.common.util.check_extension looks for.
_BASE_PROBE = _PRELUDE + """
import os, horovod
from horovod.common.util import get_extension_full_path
root = os.path.dirname(os.path.abspath(horovod.__file__))
libs = {"TensorFlow": ("tensorflow", "mpi_lib"), "PyTorch": ("torch", "mpi_lib_v2"),
        "MXNet": ("mxnet", "mpi_lib")}
ext = {fw: os.path.exists(get_extension_full_path(os.path.join(root, sub, "__init__.py"), lib))
       for fw, (sub, lib) in libs.items()}
print(MARK + json.dumps({"version": horovod.__version__, "location": root, "extensions": ext}))
"""

# Loads one framework's extension and asks it what it was compiled with (no hvd.init needed).
_FRAMEWORK_PROBE = _PRELUDE + """
import horovod.MODULE as hvd
flags = {}
for name in ("mpi_built", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built",
             "rocm_built"):
    try:
        flags[name] = bool(getattr(hvd, name)())
    except Exception:
        flags[name] = None
print(MARK + json.dumps(flags))
"""

# rc.initialize=False: only the library is queried; MPI_Init outside a launcher is slow and can
# fail in containers, and Get_library_version is allowed before it.
_MPI4PY_PROBE = _PRELUDE + """
import mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI
print(MARK + json.dumps({"version": mpi4py.__version__,
                         "library": MPI.Get_library_version().replace(chr(0), "").strip(),
                         "standard": "%d.%d" % MPI.Get_version()}))
"""

FRAMEWORKS = (("PyTorch", "torch"), ("TensorFlow", "tensorflow"))
TENSOR_OPS = (("NCCL", "nccl_built"), ("DDL", "ddl_built"), ("CCL", "ccl_built"),
              ("MPI", "mpi_built"), ("Gloo", "gloo_built"))
# Distributions that provide each import name (tensorflow-cpu installs `tensorflow`).
DISTRIBUTIONS = {"torch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos",
                                                      "tf-nightly"),
                 "keras": ("keras",), "mpi4py": ("mpi4py",), "horovod": ("horovod",)}
SETUP_FIX = "run bash mpi/setup.sh (builds Horovod 0.28.1 with PyTorch, TensorFlow, MPI and Gloo)"


# ---- running probes -------------------------------------------------------------------------------
def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _run(cmd: List[str], timeout: float = PROBE_TIMEOUT) -> Dict[str, Any]:
    """Run ``cmd``; never raises. Returns rc, stdout, an error summary (None when rc == 0), seconds."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"rc": None, "stdout": "", "error": f"timed out after {timeout:.0f}s",
                "seconds": round(time.monotonic() - start, 1)}
    except OSError as e:
        return {"rc": None, "stdout": "", "error": str(e), "seconds": 0.0}
    error = None
    if out.returncode < 0:  # a segfault/abort in a C extension
        try:
            sig = signal.Signals(-out.returncode).name
        except ValueError:
            sig = str(-out.returncode)
        error = f"crashed with {sig}" + (f" ({_last_line(out.stderr)})" if _last_line(out.stderr) else "")
    elif out.returncode != 0:
        error = _last_line(out.stderr) or f"exit code {out.returncode}"
    return {"rc": out.returncode, "stdout": out.stdout, "error": error,
            "seconds": round(time.monotonic() - start, 1)}


def _probe(code: str) -> Dict[str, Any]:
    """Run a python snippet with this interpreter; ``result`` is the JSON it printed, else None."""
    res = _run([sys.executable, "-c", code.replace("MARK", repr(_MARK))])
    res["result"] = None
    for line in res.pop("stdout").splitlines():
        if line.startswith(_MARK):
            res["result"] = json.loads(line[len(_MARK):])
    if res["result"] is None and res["error"] is None:
        res["error"] = "printed no answer"
    return res


# ---- facts that need no subprocess ----------------------------------------------------------------
def package_version(name: str) -> Optional[str]:
    """Installed version from metadata, without importing the package (torch/TF imports take seconds)."""
    for dist in DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def parse_mpirun_version(text: str) -> Dict[str, Optional[str]]:
    """``mpirun --version`` text -> implementation and version (Open MPI, MPICH/Hydra, Intel MPI)."""
    m = re.search(r"\(Open MPI\)\s+(\S+)", text)
    if m:
        return {"implementation": "Open MPI", "version": m.group(1)}
    m = re.search(r"Intel\(R\) MPI Library.*?Version\s+(\S+)", text)
    if m:
        return {"implementation": "Intel MPI", "version": m.group(1).rstrip(",")}
    if "HYDRA" in text:
        m = re.search(r"Version:\s*(\S+)", text)
        return {"implementation": "MPICH", "version": m.group(1) if m else None}
    first = _last_line(text.splitlines()[0] if text.strip() else "")
    return {"implementation": first or None, "version": None}


def cpu_facts() -> Dict[str, Optional[int]]:
    usable = None
    if hasattr(os, "sched_getaffinity"):  # a container or taskset may allow fewer than cpu_count
        usable = len(os.sched_getaffinity(0))
    return {"count": os.cpu_count(), "usable": usable or os.cpu_count()}


def memory_facts() -> Dict[str, Optional[float]]:
    facts: Dict[str, Optional[float]] = {"total_gib": None, "available_gib": None}
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        for key, field in (("total_gib", "MemTotal"), ("available_gib", "MemAvailable")):
            if field in info:
                facts[key] = round(int(info[field].split()[0]) / 2 ** 20, 1)  # kB -> GiB
    except OSError:
        pass
    return facts


def _ipv4_ioctl(name: str) -> List[str]:
    """Primary IPv4 address of an interface without psutil (SIOCGIFADDR)."""
    import fcntl
    import socket
    import struct
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        return [socket.inet_ntoa(packed[20:24])]
    except OSError:
        return []


def network_facts() -> Dict[str, Any]:
    """Interfaces with their IPv4 addresses, and the one Gloo would use.

    horovodrun on local hosts only uses the interfaces that hold 127.0.0.1 (the loopback);
    across hosts it probes for common routed interfaces, unless HOROVOD_GLOO_IFACE / --network-interface
    names one.
    """
    interfaces: Dict[str, List[str]] = {}
    try:
        import socket

        import psutil  # horovodrun itself uses psutil, so this is the same view it has
        for name, addrs in psutil.net_if_addrs().items():
            interfaces[name] = [a.address for a in addrs if a.family == socket.AF_INET]
        source = "psutil"
    except Exception:
        source = "/sys/class/net"
        try:
            for name in sorted(os.listdir("/sys/class/net")):
                interfaces[name] = _ipv4_ioctl(name)
        except OSError:
            source = "unavailable"
    loopback = sorted(n for n, a in interfaces.items() if "127.0.0.1" in a)
    multi_host = sorted(n for n, a in interfaces.items()
                        if a and not any(ip.startswith("127.") for ip in a))
    gloo_env = os.environ.get("HOROVOD_GLOO_IFACE") or None
    single = gloo_env if gloo_env else (loopback[0] if loopback else None)
    return {"source": source, "interfaces": interfaces, "gloo_iface_env": gloo_env,
            "single_host_iface": single, "loopback": loopback, "multi_host_candidates": multi_host}


def launcher_facts() -> Dict[str, Optional[str]]:
    beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return {"horovodrun": shutil.which("horovodrun"),
            "horovodrun_beside_python": beside if os.access(beside, os.X_OK) else None,
            "mpirun": shutil.which("mpirun")}


# ---- the report -------------------------------------------------------------------------------------
def collect() -> Dict[str, Any]:
    """Gather every fact and judge it; returns the dict that ``--json`` prints."""
    start = time.monotonic()
    launchers = launcher_facts()
    packages = {name: package_version(name) for name in ("horovod", "torch", "tensorflow", "keras", "mpi4py")}
    # The probes are independent and mostly wait on imports: run them side by side.
    jobs = {"base": lambda: _probe(_BASE_PROBE),
            "torch": lambda: _probe(_FRAMEWORK_PROBE.replace("MODULE", "torch")),
            "tensorflow": lambda: _probe(_FRAMEWORK_PROBE.replace("MODULE", "tensorflow")),
            "mpi4py": lambda: _probe(_MPI4PY_PROBE)}
    if launchers["mpirun"]:
        jobs["mpirun"] = lambda: _run([launchers["mpirun"], "--version"], timeout=30)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}

    problems: List[str] = []
    warnings: List[str] = []

    def problem(what: str, fix: str) -> None:
        problems.append(f"{what}; fix: {fix}")

    # Horovod and what it was built with.
    base = results["base"]
    horovod: Dict[str, Any] = {"importable": base["result"] is not None, "error": base["error"],
                               "version": (base["result"] or {}).get("version") or packages["horovod"],
                               "location": (base["result"] or {}).get("location"),
                               "frameworks": {"TensorFlow": False, "PyTorch": False, "MXNet": False},
                               "controllers": {"MPI": False, "Gloo": False},
                               "tensor_operations": {op: False for op, _ in TENSOR_OPS},
                               "cuda_built": False, "rocm_built": False, "probes": {}}
    if not horovod["importable"]:
        # One line: the framework probes failed for the same reason, repeating it would be noise.
        problem(f"horovod is not importable ({base['error']})", SETUP_FIX)
    else:
        extensions = base["result"]["extensions"]
        horovod["frameworks"]["MXNet"] = bool(extensions.get("MXNet"))
        loaded = []
        for label, module in FRAMEWORKS:
            res = results[module]
            horovod["probes"][module] = {"ok": res["result"] is not None, "error": res["error"],
                                         "seconds": res["seconds"]}
            if package_version(module) is None:
                warnings.append(f"{label} ({module}) is not installed; hvdkit's {label} adapter is unavailable")
            elif not extensions.get(label):
                flag = "HOROVOD_WITH_PYTORCH" if module == "torch" else "HOROVOD_WITH_TENSORFLOW"
                problem(f"Horovod {horovod['version']} was built without {label} support",
                        f"rebuild it with {flag}=1: {SETUP_FIX}")
            elif res["result"] is None:
                problem(f"import horovod.{module} fails ({res['error']})",
                        f"rebuild Horovod against the installed {module} {package_version(module)}: {SETUP_FIX}")
            else:
                horovod["frameworks"][label] = True
                loaded.append(res["result"])
        if not loaded and not any(package_version(m) for _, m in FRAMEWORKS):
            problem("neither torch nor tensorflow is installed", "pip install -e '.[torch,tensorflow]'")
        # Built flags are per extension; report the union (they come from one build anyway).
        for flags in loaded:
            for op, key in TENSOR_OPS:
                horovod["tensor_operations"][op] |= bool(flags.get(key))
            horovod["cuda_built"] |= bool(flags.get("cuda_built"))
            horovod["rocm_built"] |= bool(flags.get("rocm_built"))
        horovod["controllers"] = {"MPI": horovod["tensor_operations"]["MPI"],
                                  "Gloo": horovod["tensor_operations"]["Gloo"]}
        if loaded:
            if not horovod["controllers"]["MPI"]:
                problem("Horovod was built without MPI (mpirun launches cannot work)",
                        f"install OpenMPI (apt-get install openmpi-bin libopenmpi-dev), then "
                        f"rebuild with HOROVOD_WITH_MPI=1: {SETUP_FIX}")
            if not horovod["controllers"]["Gloo"]:
                problem("Horovod was built without Gloo (horovodrun --gloo and elastic runs cannot work)",
                        f"rebuild with HOROVOD_WITH_GLOO=1 (needs cmake): {SETUP_FIX}")

    # Launchers: the launch lines hvdkit prints say `horovodrun`/`mpirun`, so a PATH miss is a problem
    # even when the venv has horovodrun beside its python.
    if not launchers["horovodrun"]:
        if launchers["horovodrun_beside_python"]:
            venv_bin = os.path.dirname(launchers["horovodrun_beside_python"])
            problem("horovodrun is not on the PATH",
                    f"activate the venv (source {os.path.join(venv_bin, 'activate')}) "
                    f"or export PATH={venv_bin}:$PATH")
        else:
            problem("horovodrun is not on the PATH (and not installed beside this python)",
                    f"activate the venv (source .venv/bin/activate) or {SETUP_FIX}")
    mpi: Dict[str, Any] = {"mpirun": launchers["mpirun"], "implementation": None, "version": None,
                           "error": None}
    if not launchers["mpirun"]:
        problem("mpirun is not on the PATH",
                "install OpenMPI (apt-get install openmpi-bin libopenmpi-dev) or run bash mpi/setup.sh")
    else:
        res = results["mpirun"]
        mpi.update(parse_mpirun_version(res["stdout"] + "\n"))
        mpi["error"] = res["error"]
        if res["error"]:
            problem(f"mpirun --version fails ({res['error']})",
                    "reinstall OpenMPI (apt-get install --reinstall openmpi-bin)")

    # mpi4py: the examples and tests use it to check collectives against a second implementation.
    res = results["mpi4py"]
    mpi4py = {"installed": packages["mpi4py"] is not None, "version": packages["mpi4py"],
              "library": None, "mpi_standard": None, "error": None}
    if packages["mpi4py"] is None:
        problem("mpi4py is not installed", "pip install mpi4py (or pip install -e '.[mpi]')")
    elif res["result"] is None:
        mpi4py["error"] = res["error"]
        problem(f"mpi4py does not load its MPI library ({res['error']})",
                "reinstall it against the system MPI: pip install --no-cache-dir --force-reinstall mpi4py")
    else:
        mpi4py.update(version=res["result"]["version"], library=res["result"]["library"],
                      mpi_standard=res["result"]["standard"])
        lib_impl = "Open MPI" if "Open MPI" in mpi4py["library"] else (
            "MPICH" if "MPICH" in mpi4py["library"] else None)
        if lib_impl and mpi["implementation"] in ("Open MPI", "MPICH") and lib_impl != mpi["implementation"]:
            warnings.append(f"mpi4py uses {lib_impl} but mpirun is {mpi['implementation']}; "
                            "ranks launched by this mpirun will not see each other in mpi4py")

    # Keras 3 trap: Horovod 0.28.1 predates Keras 3.
    keras = packages["keras"]
    if keras and keras.split(".")[0].isdigit() and int(keras.split(".")[0]) >= 3:
        warnings.append(f"Keras {keras}: Horovod {horovod['version'] or '0.28.1'}'s own Keras helpers "
                        "(horovod.tensorflow.keras.DistributedOptimizer, BroadcastGlobalVariablesCallback, "
                        "DistributedGradientTape) silently stop averaging gradients or raise on Keras 3; "
                        "use hvdkit's Keras adapter (hvdkit.keras) instead")

    cpu = cpu_facts()
    if (cpu["usable"] or 1) < 2:
        warnings.append(f"only {cpu['usable']} usable core(s): -np 2 runs oversubscribe and are slow "
                        "(hvdkit launch adds --oversubscribe for mpirun)")
    network = network_facts()
    if network["gloo_iface_env"] and network["gloo_iface_env"] not in network["interfaces"]:
        problem(f"HOROVOD_GLOO_IFACE={network['gloo_iface_env']} names no interface on this host",
                f"unset it or set it to one of {', '.join(sorted(network['interfaces']))}")
    elif network["source"] != "unavailable" and not network["loopback"]:
        problem("no interface holds 127.0.0.1, so single-host horovodrun fails",
                "bring the loopback up (ip link set lo up)")

    return {"ok": not problems, "hvdkit": __version__,
            "python": {"version": platform.python_version(), "executable": sys.executable},
            "horovod": horovod, "mpi": mpi, "mpi4py": mpi4py,
            "packages": packages, "cpu": cpu, "memory": memory_facts(), "network": network,
            "launchers": launchers, "problems": problems, "warnings": warnings,
            "seconds": round(time.monotonic() - start, 1)}


def _checks(flags: Dict[str, bool]) -> str:
    return "  ".join(f"[{'X' if on else ' '}] {name}" for name, on in flags.items())


def format_report(r: Dict[str, Any]) -> str:
    """The human report: aligned facts, then warnings, problems and the verdict line."""
    h, mpi, m4, net, pk = r["horovod"], r["mpi"], r["mpi4py"], r["network"], r["packages"]
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
    rows += [(name, pk[name] or "not installed") for name in ("torch", "tensorflow", "keras")]
    mem = r["memory"]
    rows += [("cores", f"{r['cpu']['usable']} usable of {r['cpu']['count']}"),
             ("memory", f"{mem['total_gib']} GiB total, {mem['available_gib']} GiB available"
              if mem["total_gib"] else "unknown"),
             ("interfaces", "; ".join(f"{n} {', '.join(a) or '-'}" for n, a in sorted(net["interfaces"].items()))
              + f"  (from {net['source']})")]
    gloo = (f"HOROVOD_GLOO_IFACE={net['gloo_iface_env']}" if net["gloo_iface_env"]
            else f"single host: {net['single_host_iface'] or 'none'} (loopback)")
    if net["multi_host_candidates"]:
        gloo += f"; multi host: one of {', '.join(net['multi_host_candidates'])} (--network-interface)"
    rows.append(("gloo iface", gloo))
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
