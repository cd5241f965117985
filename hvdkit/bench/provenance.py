"""What a bench report was measured on: the kit's commit, the Horovod build, the frameworks' versions, the cores and
the machine's load, so a table read months later says which code and which build its numbers belong to.

Taken when a bench starts (:func:`provenance`): a run lasts minutes to an hour, and the checkout can change under it.
Versions come from the installed distributions' metadata (nothing is imported); the Horovod build is the wheel pip
installed it from (``direct_url.json``): the setup keeps each build in a directory named after its build key, which
hashes ``mpi/patch_horovod.py``, so two builds with different patches never share a name. The load average at the
start says whether the machine was idle; at the end (:func:`finished`) it is mostly the bench's own workers.
Every lookup that fails gives None: a report is never lost to its footer.

Example::

    >>> made = provenance()
    >>> sorted(made)
    ['commit', 'cores', 'horovod_build', 'load_average', 'python', 'started', 'versions']
    >>> provenance_line(finished(made)).startswith("Measured on hvdkit ")
    True
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Dict, Optional
from urllib.parse import unquote, urlparse

from ..doctor.facts import cpu_facts, package_version

# the directory that holds the hvdkit package: a checkout's top when the kit runs from one (editable install)
_KIT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CODE = ("hvdkit", "mpi", "setup.cfg")   # what "+dirty" is about: not docs/bench's copies of reports


def _horovod_build() -> Optional[str]:
    """The setup's build directory of the wheel Horovod came from (``horovod-<versions>-<key>``), else the wheel's
    file name, else None (installed from an index or a source tree)."""
    try:
        text = metadata.distribution("horovod").read_text("direct_url.json")
        url = urlparse(json.loads(text)["url"])
    except (metadata.PackageNotFoundError, TypeError, ValueError, KeyError):
        return None
    parts = unquote(url.path).rstrip("/").split("/")
    if url.scheme != "file" or not parts[-1].endswith(".whl"):
        return None
    return parts[-2] if len(parts) >= 2 and parts[-2].startswith("horovod-") else parts[-1]


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", _KIT_ROOT, *args], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _commit() -> Optional[str]:
    """``<sha>`` of the checkout the kit runs from, ``<sha>+dirty`` when its code has uncommitted changes; None when
    the kit is not a checkout of its own (installed into another project's tree, or no git)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(_KIT_ROOT):
        return None
    head = _git("rev-parse", "--short=12", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *_CODE)
    return None if head is None else head + ("+dirty" if dirty else "")


def _load() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def provenance() -> Dict:
    """A report's ``provenance`` entry, taken when its bench starts (see the module's docstring)."""
    return {"commit": _commit(), "horovod_build": _horovod_build(),
            "versions": {name: package_version(name) for name in ("hvdkit", "horovod", "torch", "tensorflow",
                                                                  "keras", "mpi4py")},
            "python": platform.python_version(), "cores": cpu_facts()["usable"], "load_average": _load(),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def finished(made: Dict) -> Dict:
    """``made`` with the load average as the bench ends."""
    return dict(made, load_average_end=_load())


def provenance_line(p: Optional[Dict]) -> str:
    """One markdown line for a report's footer ("" for a report written before reports carried one)."""
    if not p:
        return ""
    versions = ", ".join(f"{d} {v}" for d, v in p["versions"].items() if v and d != "hvdkit") or "no frameworks"

    def load(key):
        return "/".join(f"{x:g}" for x in p[key]) if p.get(key) else "?"
    return (f"Measured on hvdkit {p['commit'] or p['versions'].get('hvdkit') or '(commit unknown)'}, Horovod build "
            f"{p['horovod_build'] or '(unknown)'}; {versions}; Python {p['python']}; {p['cores']} cores; load "
            f"average (1/5/15 min) {load('load_average')} at the start, {load('load_average_end')} at the end; "
            f"started {p['started']}.")
