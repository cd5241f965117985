"""What a bench report was measured on: the kit's commit, the Horovod build, the frameworks' versions, the machine's
cores and its load, so a table read months later says which code and which build its numbers belong to.

Versions come from the installed distributions' metadata (no framework is imported); the Horovod build is the
name of the wheel pip installed it from (``direct_url.json``), whose suffix is the setup's build key (it hashes
``mpi/patch_horovod.py``, so two builds with different patches never share a name). The load average is the
machine's at the moment the report is written: the 15-minute figure spans most of a bench run, and a figure well
above the bench's own workers says other work shared the cores.

Example::

    >>> p = provenance()
    >>> sorted(p)  # doctest: +NORMALIZE_WHITESPACE
    ['commit', 'cores', 'horovod_build', 'load_average', 'python', 'versions', 'written']
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Dict, Optional
from urllib.parse import unquote

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _horovod_build() -> Optional[str]:
    """The wheel file Horovod was installed from (the kit's setup names it after its build key), else None."""
    try:
        text = metadata.distribution("horovod").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    url = json.loads(text).get("url", "") if text else ""
    parts = unquote(url).rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1].endswith(".whl") else (parts[-1] or None)


def _commit() -> Optional[str]:
    """``<sha>`` of the checkout the kit runs from, ``<sha>+dirty`` when it has uncommitted changes, None outside
    git (an installed wheel)."""
    def git(*args):
        return subprocess.run(["git", "-C", _PACKAGE_DIR, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def provenance() -> Dict:
    """The report's ``provenance`` entry (see the module's docstring)."""
    return {"commit": _commit(), "horovod_build": _horovod_build(),
            "versions": {"horovod": _version("horovod"), "torch": _version("torch"),
                         "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
                         "keras": _version("keras"), "mpi4py": _version("mpi4py")},
            "python": platform.python_version(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def provenance_line(p: Optional[Dict]) -> str:
    """One markdown line for a report's footer ("" for a report written before reports carried one)."""
    if not p:
        return ""
    versions = ", ".join(f"{d} {v}" for d, v in p["versions"].items() if v)
    load = "/".join(f"{x:g}" for x in p["load_average"])
    return (f"Measured on hvdkit {p['commit'] or '(not a git checkout)'}, Horovod build "
            f"{p['horovod_build'] or '(unknown)'}; {versions}; Python {p['python']}; {p['cores']} cores, "
            f"load average {load} (1/5/15 min) when written, {p['written']}.")
