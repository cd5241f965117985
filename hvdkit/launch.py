"""The one place that builds launch commands, so tests, examples, docs and the CLI agree.

Example::

    >>> launch_command(["train.py", "--epochs", "1"], np=2, launcher="horovodrun", python="python")
    ['env', 'OMPI_MCA_btl_vader_single_copy_mechanism=none', 'horovodrun', '-np', '2', '-H', 'localhost:2', '--mpi',
     'python', 'train.py', '--epochs', '1']
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import socket
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import HvdkitError

LAUNCHERS = ("horovodrun", "mpirun")
# Environment that mpirun forwards to remote ranks (local ones inherit it anyway).
FORWARDED_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV")
# Also forwarded by mpirun when a host is remote: the settings of Horovod, hvdkit and OpenMP threads.
# (horovodrun passes its whole environment to every worker, remote ones included, by itself.)
FORWARDED_PREFIXES = ("HOROVOD_", "HVDKIT_", "OMP_")
CONTROLLERS = ("gloo", "mpi")


def find_tool(name: str, python: Optional[str] = None) -> Optional[str]:
    """The path of ``name`` next to ``python`` (the venv's horovodrun) or else on PATH; None if neither.

    >>> find_tool("no-such-launcher-here", "/usr/bin/python3") is None
    True
    """
    python = python or sys.executable
    beside = os.path.join(os.path.dirname(python), name)
    if os.path.isabs(python) and os.access(beside, os.X_OK):
        return beside
    return shutil.which(name)


def _tool(name: str, python: str) -> str:
    """:func:`find_tool`, or the bare name (so ``--print`` still shows a line on a machine without the tool)."""
    return find_tool(name, python) or name


# Horovod's Gloo timeout (default 30 s) also bounds the rendezvous wait for a worker that joins an elastic job: one
# that takes longer to start (Python, torch or TF, its data) kills every rank with gloo::IoException, which elastic
# does not recover from. Seen with 30 s on a loaded 2-core machine (a torch worker joining a 3-worker job); 60 s has
# passed every such run here. The price: a peer that goes silent (a cut-off host) is noticed after 60 s, not 30 s,
# and so is a killed one by one survivor of a job of 3 or more (it waits out the timeout in a recv); in a 2-worker
# job the survivor sees the reset at once. Kept when set, or when horovodrun gets --gloo-timeout-seconds
# (README "Timeouts").
GLOO_TIMEOUT_VAR = "HOROVOD_GLOO_TIMEOUT_SECONDS"
ELASTIC_GLOO_TIMEOUT = 60


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


def horovodrun_controller(launcher: str, controller: Optional[str], elastic: bool) -> Optional[str]:
    """horovodrun's controller for a launch: the one asked for, else ``mpi`` for a static job and ``gloo`` for an
    elastic one (the only one elastic has); None under mpirun. A choice that cannot apply is one clear error.

        >>> horovodrun_controller("horovodrun", None, elastic=False)
        'mpi'
    """
    if controller is not None and controller not in CONTROLLERS:
        raise HvdkitError(f"unknown controller {controller!r}; use one of {', '.join(CONTROLLERS)}")
    if controller == "mpi" and (launcher != "horovodrun" or elastic):
        raise HvdkitError("--controller mpi applies to static horovodrun launches only (mpirun is MPI already; an "
                          "elastic job, --hosts-file, runs on Gloo only); drop it")
    if controller == "gloo" and launcher != "horovodrun":
        raise HvdkitError("--controller gloo applies to horovodrun only; drop it (mpirun runs MPI) or pass "
                          "--launcher horovodrun")
    if launcher != "horovodrun":
        return None
    return controller or ("gloo" if elastic else "mpi")


def launch_command(script: Sequence[str], np: int = 2, launcher: str = "horovodrun",
                   hosts: Optional[str] = None, python: Optional[str] = None,
                   env: Optional[Dict[str, str]] = None, extra: Sequence[str] = (),
                   elastic: Optional[Elastic] = None, network_interface: Optional[str] = None,
                   ssh_port: Optional[int] = None, ssh_identity_file: Optional[str] = None,
                   forward: Sequence[str] = (), controller: Optional[str] = None) -> List[str]:
    """argv that runs ``python script...`` on ``np`` workers.

    horovodrun: static jobs on the MPI controller and MPI tensor ops (``--mpi``: horovodrun runs mpirun; 1.19x the
    Gloo samples/s on the bench CNN at 2 workers, README "Tuned defaults"), elastic jobs on Gloo (``--gloo``, which
    elastic needs).
    mpirun (OpenMPI): no core binding, ranks tagged in the output (``--tag-output``), ``--allow-run-as-root``
    when root, ``--oversubscribe`` when ``np`` exceeds the cores (on this machine only), environment forwarded with ``-x``.
    hosts: ``"host1:2,host2:2"``; default ``localhost:np``. ``env`` adds variables for every rank.
    elastic: an :class:`Elastic` (horovodrun only): hosts then come from its discovery command.
    Across machines: ``network_interface`` (e.g. "eth0") for the ring and, under mpirun, the daemons' links;
    ``ssh_port``/``ssh_identity_file`` for the ssh logins (mpirun: ``--mca plm_rsh_args``); ``forward``:
    ``NAME`` or ``NAME=VALUE`` for every rank (mpirun ``-x``; horovodrun forwards its environment itself).
    mpirun with a remote host also forwards HOROVOD_*, HVDKIT_*, OMP_* and PYTHONUNBUFFERED.
    controller: horovodrun's ``mpi`` (the default for static jobs) or ``gloo`` (the default, and the only choice,
    for elastic ones). Elastic jobs get ``HOROVOD_GLOO_TIMEOUT_SECONDS=60`` (``ELASTIC_GLOO_TIMEOUT``) unless it is in
    ``env`` or in this process's environment, or ``extra`` has horovodrun's ``--gloo-timeout-seconds``.
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
    controller = horovodrun_controller(launcher, controller, elastic=elastic is not None)
    names, values = _split_forward(forward)
    env.update(values)
    if (elastic is not None and GLOO_TIMEOUT_VAR not in env and GLOO_TIMEOUT_VAR not in os.environ
            and not any(arg.startswith("--gloo-timeout-seconds") for arg in extra)):
        env[GLOO_TIMEOUT_VAR] = str(ELASTIC_GLOO_TIMEOUT)
    if launcher == "horovodrun":
        if elastic is not None and network_interface and not elastic.network_interface:
            elastic = dataclasses.replace(elastic, network_interface=network_interface)
        where = elastic.args() if elastic else ["-H", hosts]
        if network_interface and elastic is None:
            where += ["--network-interface", network_interface]
        if ssh_port:
            where += ["--ssh-port", str(ssh_port)]
        if ssh_identity_file:
            where += ["--ssh-identity-file", ssh_identity_file]
        if controller == "mpi":
            # as hvdkit's own mpirun command does (below); horovodrun --mpi pins only the ranks' links to the
            # interface, so the daemons' own links are pinned here
            env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism",
                           os.environ.get("OMPI_MCA_btl_vader_single_copy_mechanism", "none"))
            if network_interface and elastic is None:
                env.setdefault("OMPI_MCA_oob_tcp_if_include", network_interface)
        cmd = [_tool("horovodrun", python), "-np", str(np), *where, f"--{controller}", *extra]
        # horovodrun passes its own environment to the workers; set extra variables with `env`.
        if env:
            cmd = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *cmd]
        return cmd + [python, *script]
    # --tag-output prefixes each worker line with [jobid,rank]<stream>: so a failure can be pinned on a rank
    # (horovodrun tags its workers' lines by itself).
    cmd = [_tool("mpirun", python), "-np", str(np), "-H", hosts, "--bind-to", "none", "--map-by", "slot",
           "--tag-output"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    remote = not all(_is_local(host) for host in _host_names(hosts))
    if int(np) > (os.cpu_count() or 1) and not remote:   # this machine's cores say nothing about other hosts
        cmd.append("--oversubscribe")
    # Containers often forbid the cross-memory-attach single copy; the fallback is as fast for our sizes.
    cmd += ["--mca", "btl_vader_single_copy_mechanism", "none"]
    if network_interface:   # the ranks' TCP links and the daemons' own (out-of-band) links
        cmd += ["--mca", "btl_tcp_if_include", network_interface, "--mca", "oob_tcp_if_include", network_interface]
    ssh_args = ([f"-p {ssh_port}"] if ssh_port else []) + ([f"-i {ssh_identity_file}"] if ssh_identity_file else [])
    if ssh_args:
        cmd += ["--mca", "plm_rsh_args", " ".join(ssh_args)]
    forwarded = [n for n in FORWARDED_ENV if n in os.environ]
    if remote:
        forwarded += sorted(n for n in os.environ if n.startswith(FORWARDED_PREFIXES))
        if "PYTHONUNBUFFERED" not in env:    # remote output line by line, not at exit
            env["PYTHONUNBUFFERED"] = os.environ.get("PYTHONUNBUFFERED", "1")
    for name in dict.fromkeys(forwarded + names):   # unique, in order
        if name not in env:
            cmd += ["-x", name]
    for key, value in sorted(env.items()):
        cmd += ["-x", f"{key}={value}"]
    return cmd + [*extra, python, *script]


def _split_forward(forward: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """``-x`` items: names to pass on as they are set here, and NAME=VALUE pairs.

    >>> _split_forward(["PATH", "A=1"])
    (['PATH'], {'A': '1'})
    """
    names, values = [], {}
    for item in forward:
        name, eq, value = item.partition("=")
        if not name or not (name[0].isalpha() or name[0] == "_") or not name.replace("_", "").isalnum():
            raise HvdkitError(f"-x {item!r} is not NAME or NAME=VALUE; pass e.g. -x OMP_NUM_THREADS=1")
        if eq:
            values[name] = value
        elif name not in os.environ:
            raise HvdkitError(f"-x {name}: {name} is not set here; set it or pass -x {name}=VALUE")
        else:
            names.append(name)
    return names, values


def _host_names(hosts: str) -> List[str]:
    return [item.strip().partition(":")[0] for item in hosts.split(",") if item.strip()]


def _is_local(host: str) -> bool:
    """This machine by name (no DNS lookup: a launch must not wait on a resolver)."""
    return host in ("localhost", "localhost.localdomain", socket.gethostname()) or host.startswith("127.")


def preflight(script: Sequence[str], np: int = 2, launcher: str = "horovodrun", python: Optional[str] = None,
              hosts_file: Optional[str] = None, min_np: int = 1, max_np: Optional[int] = None,
              check_files: bool = True, controller: Optional[str] = None) -> List[str]:
    """Check a launch before anything starts: raise :class:`HvdkitError` ("<problem>; <fix>") for the first
    problem, return notes worth printing. ``check_files=False`` (``--print``) checks the numbers only.

    Example::

        preflight(["examples/torch_digits.py"], np=2)   # [] : ready to launch
        preflight(["no_such.py"], np=2)   # HvdkitError: script no_such.py not found (from /work); check the path, ...
    """
    _check_numbers(np, launcher, hosts_file, min_np, max_np)
    static_mpi = horovodrun_controller(launcher, controller, elastic=hosts_file is not None) == "mpi"
    ops = os.environ.get("HOROVOD_CPU_OPERATIONS", "")
    if static_mpi and ops.strip().lower() == "gloo":   # Gloo tensor ops under the MPI controller crash in this build
        raise HvdkitError(f"HOROVOD_CPU_OPERATIONS={ops} asks for Gloo tensor ops, which a static horovodrun job "
                          "(MPI controller) cannot run; unset it, or pass --controller gloo")
    if not check_files:
        return []
    _check_script(script)
    notes = _check_hosts_file(hosts_file, np) if hosts_file else []
    _check_launcher(launcher, python or sys.executable)
    if static_mpi:   # horovodrun runs mpirun
        _check_launcher("mpirun", python or sys.executable, under_horovodrun=True)
    return notes


def _check_numbers(np: int, launcher: str, hosts_file: Optional[str], min_np: int, max_np: Optional[int]) -> None:
    if launcher not in LAUNCHERS:
        raise HvdkitError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
    if np < 1:
        raise HvdkitError(f"-np must be >= 1 (got {np}); pass the number of workers, e.g. -np 2")
    if hosts_file is None:
        return
    if launcher != "horovodrun":
        raise HvdkitError("elastic training (--hosts-file) runs under horovodrun (Gloo) only; "
                          "drop --launcher mpirun or --hosts-file")
    if min_np < 1:
        raise HvdkitError(f"--min-np must be >= 1 (got {min_np}); pass e.g. --min-np 1")
    if np < min_np:
        raise HvdkitError(f"-np {np} is below --min-np {min_np}; start with at least --min-np workers")
    if max_np is not None and max_np < np:
        raise HvdkitError(f"--max-np {max_np} is below -np {np}; raise --max-np or lower -np")


def _script_path(script: Sequence[str]) -> Optional[str]:
    """The file python will run: the first argument unless it is an option (then the first ``*.py``);
    None for ``-m module`` and ``-c code``."""
    if not script or script[0] in ("-m", "-c"):
        return None
    if not script[0].startswith("-"):
        return script[0]
    return next((arg for arg in script if arg.endswith(".py")), None)


def _check_script(script: Sequence[str]) -> None:
    path = _script_path(script)
    if path is not None and not os.path.isfile(path):
        raise HvdkitError(f"script {path} not found (from {os.getcwd()}); check the path, "
                          "e.g. hvdkit launch -np 2 examples/torch_digits.py")


def _check_hosts_file(hosts_file: str, np: int) -> List[str]:
    """The hosts file must exist and parse (the same parser horovodrun's discovery runs); fewer slots than
    ``np`` is allowed (hosts may join later) but noted."""
    from .discover_hosts import parse
    try:
        with open(hosts_file) as f:
            hosts = parse(f.read(), hosts_file)
    except FileNotFoundError:
        raise HvdkitError(f"hosts file {hosts_file} not found; create it with one host:slots per line, "
                          "e.g. localhost:2") from None
    except OSError as e:
        raise HvdkitError(f"cannot read hosts file {hosts_file} ({e.strerror}); "
                          "pass a readable file with --hosts-file") from None
    except ValueError as e:
        raise HvdkitError(str(e)) from None
    if not hosts:   # during a run an empty file drains every host (on purpose); at the start nothing could run
        raise HvdkitError(f"hosts file {hosts_file} lists no hosts; add at least one host:slots line, e.g. localhost:2")
    slots = sum(n for _, n in hosts)
    if slots < np:
        return [f"hvdkit: note: {hosts_file} lists {slots} slot(s) for -np {np}; "
                "the job waits for more hosts (up to --elastic-timeout)"]
    return []


def _check_launcher(launcher: str, python: str, under_horovodrun: bool = False) -> None:
    if find_tool(launcher, python):
        return
    fix = {"horovodrun": "install Horovod into this environment (mpi/setup.sh) or use --launcher mpirun",
           "mpirun": "install OpenMPI (apt-get install openmpi-bin) or use --launcher horovodrun --controller gloo"
           }[launcher]
    why = " (a static horovodrun job runs it)" if under_horovodrun else ""
    raise HvdkitError(f"{launcher} not found next to {python} or on PATH{why}; {fix}")
