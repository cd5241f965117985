"""The one place that builds launch commands, so tests, examples, docs and the CLI agree.

Example::

    >>> launch_command(["train.py", "--epochs", "1"], np=2, launcher="horovodrun", python="python")
    ['horovodrun', '-np', '2', '-H', 'localhost:2', '--gloo', 'python', 'train.py', '--epochs', '1']
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import HvdkitError

LAUNCHERS = ("horovodrun", "mpirun")
# Environment that mpirun forwards to remote ranks (local ones inherit it anyway).
FORWARDED_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV")


def _tool(name: str, python: str) -> str:
    """Prefer the tool next to ``python`` (the venv's horovodrun), then PATH, then the bare name."""
    beside = os.path.join(os.path.dirname(python), name)
    if os.path.isabs(python) and os.access(beside, os.X_OK):
        return beside
    return shutil.which(name) or name


@dataclasses.dataclass
class Elastic:
    """Elastic launch settings (horovodrun only). ``discovery``: a shell command printing host:slots lines.

    Defaults suit real clusters: 600 s for hosts to (re)appear, a failed host kept out 60-300 s
    before it may rejoin, and no limit on resets. ``network_interface`` (e.g. "eth0"; "lo" on one
    machine) lets a job start on one host; without it horovodrun waits for two hosts to compare NICs.
    """
    discovery: str
    min_np: int = 1
    max_np: Optional[int] = None
    timeout: int = 600
    reset_limit: Optional[int] = None
    cooldown: Optional[Tuple[int, int]] = (60, 300)
    network_interface: Optional[str] = None

    def args(self) -> List[str]:
        out = ["--min-np", str(self.min_np), "--host-discovery-script", self.discovery,
               "--elastic-timeout", str(self.timeout)]
        if self.max_np:
            out += ["--max-np", str(self.max_np)]
        if self.reset_limit is not None:
            out += ["--reset-limit", str(self.reset_limit)]
        if self.cooldown:
            out += ["--blacklist-cooldown-range", str(self.cooldown[0]), str(self.cooldown[1])]
        if self.network_interface:
            out += ["--network-interface", self.network_interface]
        return out


def discovery_command(hosts_file: str, python: Optional[str] = None) -> str:
    """The shell command horovodrun runs to discover hosts: ``python -m hvdkit.discover_hosts FILE``.

    A module, not a script path, so it works from any install (a wheel has no mpi/ directory).
    The hosts file is made absolute: horovodrun may run the command from another directory.
    """
    return (f"{shlex.quote(python or sys.executable)} -m hvdkit.discover_hosts "
            f"{shlex.quote(os.path.abspath(hosts_file))}")


def launch_command(script: Sequence[str], np: int = 2, launcher: str = "horovodrun",
                   hosts: Optional[str] = None, python: Optional[str] = None,
                   env: Optional[Dict[str, str]] = None, extra: Sequence[str] = (),
                   elastic: Optional[Elastic] = None) -> List[str]:
    """argv that runs ``python script...`` on ``np`` workers.

    horovodrun: Gloo controller (``--gloo``), the mode elastic training also needs.
    mpirun (OpenMPI): no core binding, ``--allow-run-as-root`` when root, ``--oversubscribe`` when
    ``np`` exceeds the cores, environment forwarded with ``-x``.
    hosts: ``"host1:2,host2:2"``; default ``localhost:np``. ``env`` adds variables for every rank.
    elastic: an :class:`Elastic` (horovodrun only): hosts then come from its discovery command.
    """
    if launcher not in LAUNCHERS:
        raise HvdkitError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
    if int(np) < 1:
        raise HvdkitError(f"-np must be >= 1 (got {np})")
    python = python or sys.executable
    hosts = hosts or f"localhost:{np}"
    env = dict(env or {})
    if elastic is not None and launcher != "horovodrun":
        raise HvdkitError("elastic training runs under horovodrun (Gloo) only; mpirun launches are static")
    if launcher == "horovodrun":
        where = elastic.args() if elastic else ["-H", hosts]
        cmd = [_tool("horovodrun", python), "-np", str(np), *where, "--gloo", *extra]
        # horovodrun passes its own environment to the workers; set extra variables with `env`.
        if env:
            cmd = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *cmd]
        return cmd + [python, *script]
    cmd = [_tool("mpirun", python), "-np", str(np), "-H", hosts, "--bind-to", "none", "--map-by", "slot"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if int(np) > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    # Containers often forbid the cross-memory-attach single copy; the fallback is as fast for our sizes.
    cmd += ["--mca", "btl_vader_single_copy_mechanism", "none"]
    for name in FORWARDED_ENV:
        if name in os.environ:
            cmd += ["-x", name]
    for key, value in sorted(env.items()):
        cmd += ["-x", f"{key}={value}"]
    return cmd + [*extra, python, *script]
