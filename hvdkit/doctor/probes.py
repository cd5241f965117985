"""Child-process probes for the doctor: what Horovod, its framework extensions and mpi4py report.

Horovod, torch and TensorFlow are imported only in children, with a timeout, so an import that
crashes or hangs becomes a result with an ``error`` instead of killing the doctor.

Example::

    >>> res = run_probes({"mpirun": "/usr/bin/mpirun"})
    >>> res["base"]["result"]["version"], res["torch"]["error"], res["mpirun"]["rc"]
    ('0.28.1', None, 0)
    >>> parse_mpirun_version("mpirun (Open MPI) 4.1.4\\n")
    {'implementation': 'Open MPI', 'version': '4.1.4'}
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

PROBE_TIMEOUT = 120  # seconds; a first TensorFlow import on a cold disk can take a minute
MARK = "HVDKIT_PROBE_JSON "  # the probe's answer line; anything else the imports print is noise
# Drop the current directory from the child's sys.path: a Horovod source checkout in the cwd
# would otherwise shadow the installed (built) package, which user scripts never see.
_PRELUDE = "import json, sys\nif sys.path and sys.path[0] in ('', '.'): sys.path.pop(0)\n"

# `import horovod` is light (no framework); it says where the package is and which compiled
# extensions exist, the same files horovod.common.util.check_extension looks for.
BASE_PROBE = _PRELUDE + """
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
FRAMEWORK_PROBE = _PRELUDE + """
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
MPI4PY_PROBE = _PRELUDE + """
import mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI
print(MARK + json.dumps({"version": mpi4py.__version__,
                         "library": MPI.Get_library_version().replace(chr(0), "").strip(),
                         "standard": "%d.%d" % MPI.Get_version()}))
"""


def last_line(text: str) -> str:
    """The last non-blank line (at most 300 characters): usually the exception of a failed import."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_command(cmd: List[str], timeout: float = PROBE_TIMEOUT) -> Dict[str, Any]:
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
    return {"rc": out.returncode, "stdout": out.stdout, "error": _failure(out),
            "seconds": round(time.monotonic() - start, 1)}


def _failure(out: subprocess.CompletedProcess) -> Optional[str]:
    """One line saying why a finished child failed, None when it succeeded."""
    if out.returncode < 0:  # a segfault/abort in a C extension
        try:
            sig = signal.Signals(-out.returncode).name
        except ValueError:
            sig = str(-out.returncode)
        return f"crashed with {sig}" + (f" ({last_line(out.stderr)})" if last_line(out.stderr) else "")
    if out.returncode != 0:
        return last_line(out.stderr) or f"exit code {out.returncode}"
    return None


def run_snippet(code: str) -> Dict[str, Any]:
    """Run a python snippet with this interpreter; ``result`` is the JSON it printed, else None."""
    res = run_command([sys.executable, "-c", code.replace("MARK", repr(MARK))])
    res["result"] = None
    for line in res.pop("stdout").splitlines():
        if line.startswith(MARK):
            res["result"] = json.loads(line[len(MARK):])
    if res["result"] is None and res["error"] is None:
        res["error"] = "printed no answer"
    return res


def run_probes(launchers: Dict[str, Optional[str]]) -> Dict[str, Dict[str, Any]]:
    """Every probe's result by name: base, torch, tensorflow, mpi4py, and mpirun when it is on the PATH."""
    jobs: Dict[str, Callable[[], Dict[str, Any]]] = {
        "base": lambda: run_snippet(BASE_PROBE),
        "torch": lambda: run_snippet(FRAMEWORK_PROBE.replace("MODULE", "torch")),
        "tensorflow": lambda: run_snippet(FRAMEWORK_PROBE.replace("MODULE", "tensorflow")),
        "mpi4py": lambda: run_snippet(MPI4PY_PROBE)}
    if launchers["mpirun"]:
        jobs["mpirun"] = lambda: run_command([launchers["mpirun"], "--version"], timeout=30)
    # The probes are independent and mostly wait on imports: run them side by side.
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


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
    first = last_line(text.splitlines()[0] if text.strip() else "")
    return {"implementation": first or None, "version": None}
