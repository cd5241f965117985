"""``hvdkit doctor --hosts h1,h2``: can a job run across these hosts?

Over ssh as horovodrun runs it (the same key, port and options: no host-key check, no password prompt), on every
host at once: is it reachable, is this Python (the same path: a shared filesystem or the same image) there, and are
its Python, Horovod (version, and build: its framework extensions), hvdkit, torch and TensorFlow the same as on the
first host, does the interface the ranks will use exist on every host under the same name, and is every host listed
once and under a hostname of its own (two entries answering with one hostname are one machine, or machines Gloo
cannot tell apart). One line per host, then one ``problem: <what>; fix: <how>`` line per problem; exit code 1 when
there is any.

Example::

    hvdkit doctor --hosts n1,n2 --ssh-identity-file ~/.ssh/hvd --network-interface eth0
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

SSH_TIMEOUT = 30
MARK = "HVDKIT-DOCTOR "

# Run by the host's Python: facts only, no framework import (horovod.common.util's gloo_built() imports
# TensorFlow: 15 s here), so Horovod's build is fingerprinted by its extension files (frameworks, bytes).
PROBE = r"""
import importlib.metadata as m, importlib.util, json, os, platform, socket, sys
def version(*names):
    for name in names:
        try:
            return m.version(name)
        except m.PackageNotFoundError:
            pass
    return None
build = None
try:   # which framework extensions Horovod was built with, and their sizes: a fingerprint, no import
    import glob
    spec = importlib.util.find_spec("horovod")
    root = os.path.dirname(spec.origin)
    libs = sorted(glob.glob(os.path.join(root, "*", "mpi_lib*.so")))
    build = {"frameworks": ",".join(os.path.basename(os.path.dirname(p)) for p in libs) or "none",
             "bytes": sum(os.path.getsize(p) for p in libs)}
except Exception as e:
    build = {"error": type(e).__name__}
try:
    ifaces = sorted(os.listdir("/sys/class/net"))
except OSError:
    ifaces = []
print("HVDKIT-DOCTOR " + json.dumps({"hostname": socket.gethostname(), "python": platform.python_version(),
      "executable": sys.executable, "horovod": version("horovod"), "build": build, "hvdkit": version("hvdkit"),
      "torch": version("torch"), "tensorflow": version("tensorflow", "tensorflow-cpu"), "interfaces": ifaces}))
"""

SAME = (("python", "Python"), ("horovod", "Horovod"), ("build", "Horovod's build"), ("hvdkit", "hvdkit"),
        ("torch", "torch"), ("tensorflow", "TensorFlow"))


# horovodrun's own ssh options (horovod.runner.util.remote.SSH_COMMAND_PREFIX): no host-key check, so a host missing
# from known_hosts is not reported here as unreachable when horovodrun would reach it.
HOROVODRUN_SSH_OPTIONS = ("PasswordAuthentication=no", "StrictHostKeyChecking=no")


def ssh_argv(host: str, cmd: Sequence[str], port: Optional[int] = None, key: Optional[str] = None) -> List[str]:
    """ssh as horovodrun runs it (its options, ``-p``, ``-i``), failing instead of prompting (BatchMode: a launcher
    cannot answer a prompt either, e.g. for a key's passphrase).

    >>> ssh_argv("n1", ["true"], port=2222, key="/k")  # doctest: +NORMALIZE_WHITESPACE
    ['ssh', '-o', 'PasswordAuthentication=no', '-o', 'StrictHostKeyChecking=no', '-o', 'BatchMode=yes',
     '-o', 'ConnectTimeout=10', '-p', '2222', '-i', '/k', 'n1', 'true']
    """
    options = [arg for option in (*HOROVODRUN_SSH_OPTIONS, "BatchMode=yes", "ConnectTimeout=10")
               for arg in ("-o", option)]
    return ["ssh", *options, *(["-p", str(port)] if port else []), *(["-i", key] if key else []), host, *cmd]


def probe(host: str, python: str, port: Optional[int] = None, key: Optional[str] = None) -> Dict:
    """The host's facts, or ``{"error": ..., "kind": "ssh" | "python"}``."""
    import shlex
    remote = f"{shlex.quote(python)} -c {shlex.quote(PROBE)}"
    try:
        done = subprocess.run(ssh_argv(host, [remote], port, key), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=SSH_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {SSH_TIMEOUT} s", "kind": "ssh"}
    except FileNotFoundError:
        return {"error": "no ssh client here", "kind": "ssh"}
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].strip()
    kind = "ssh" if done.returncode == 255 else "python"
    return {"error": last, "kind": kind}


def problems_of(facts: Dict[str, Dict], python: str, iface: Optional[str], port: Optional[int] = None,
                key: Optional[str] = None) -> List[str]:
    """Problems (``<what>; fix: <how>``) across hosts' facts (host -> :func:`probe` result), in host order.

    >>> ok = {"python": "3.11.2", "horovod": "0.28.1", "build": {"frameworks": "torch", "bytes": 9}, "torch": "2.1",
    ...       "tensorflow": None, "interfaces": ["eth0", "lo"]}
    >>> problems_of({"a": ok, "b": dict(ok, horovod="0.28.0", interfaces=["lo", "ens3"])}, "/py", None)[0]
    'b has Horovod 0.28.0, a has 0.28.1; fix: install the same environment on every host (the same path, e.g. a shared filesystem or one image)'
    """
    found = []
    ssh_opts = " ".join([*([f"-p {port}"] if port else []), *([f"-i {key}"] if key else [])])
    for host, f in facts.items():
        if f.get("kind") == "ssh":
            found.append(f"cannot ssh to {host} ({f['error']}); fix: check the name resolves and sshd runs there, "
                         f"then allow this key without a password: ssh-copy-id {ssh_opts + ' ' if ssh_opts else ''}"
                         f"{host} (and pass it with --ssh-identity-file)")
        elif "error" in f:
            found.append(f"{host} cannot run {python} ({f['error']}); fix: install this environment at the same "
                         "path on every host (a shared filesystem or one image)")
    good = {h: f for h, f in facts.items() if "error" not in f}
    if not good:
        return found
    found += _same_hostname(good)
    first, ref = next(iter(good.items()))
    for host, f in list(good.items())[1:]:
        for key_, what in SAME:
            if f.get(key_) != ref.get(key_):
                found.append(f"{host} has {what} {_show(f.get(key_))}, {first} has {_show(ref.get(key_))}; fix: "
                             "install the same environment on every host (the same path, e.g. a shared filesystem "
                             "or one image)")
    for host, f in good.items():
        if f.get("horovod") is None:
            found.append(f"{host} has no Horovod for {python}; fix: install Horovod 0.28.1 there (bash mpi/setup.sh)")
    if iface:
        for host, f in good.items():
            if iface not in f.get("interfaces", []):
                found.append(f"{host} has no interface {iface} (it has {', '.join(f.get('interfaces', [])) or 'none'}); "
                             "fix: pass --network-interface with a name every host has")
    else:
        common = set.intersection(*(set(f.get("interfaces", [])) for f in good.values())) - {"lo"}
        if not common and len(good) > 1:
            listed = "; ".join(f"{h}: {', '.join(f.get('interfaces', []))}" for h, f in good.items())
            found.append(f"no interface name is on every host ({listed}); "
                         "fix: rename interfaces alike (e.g. udev/netplan) so --network-interface can name one")
    return found


def listed_twice(hosts: Sequence[str]) -> List[str]:
    """Problems for hosts given more than once, in order of first mention.

    >>> listed_twice(["a", "b", "a"])
    ["a is given 2 times in --hosts; fix: list each host once (a launch gives a host several slots with host:N or 'host slots=N', not by repeating it)"]
    """
    counts = {host: hosts.count(host) for host in dict.fromkeys(hosts)}
    return [f"{host} is given {n} times in --hosts; fix: list each host once (a launch gives a host several slots "
            "with host:N or 'host slots=N', not by repeating it)" for host, n in counts.items() if n > 1]


def _same_hostname(good: Dict[str, Dict]) -> List[str]:
    """One problem per hostname that several listed hosts answer with (one machine under two names, e.g. a name
    and its address, or cloned machines): a launch would start twice the ranks there, or Gloo mix the hosts up."""
    by_name: Dict[str, List[str]] = {}
    for host, f in good.items():
        if f.get("hostname"):
            by_name.setdefault(f["hostname"], []).append(host)
    return [f"{' and '.join(hosts)} answer with the same hostname {name}; fix: if they are one machine, list it once; "
            "if not, give each its own hostname (hostnamectl set-hostname NAME): Horovod tells hosts apart by it"
            for name, hosts in by_name.items() if len(hosts) > 1]


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def run_hosts_doctor(hosts: Sequence[str], iface: Optional[str] = None, port: Optional[int] = None,
                     key: Optional[str] = None, python: Optional[str] = None) -> int:
    """Probe ``hosts`` (each once) in parallel, print one line per host and one per problem; return 0 (none) or 1."""
    python = python or sys.executable
    twice, hosts = listed_twice(hosts), list(dict.fromkeys(hosts))
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        facts = dict(zip(hosts, pool.map(lambda h: probe(h, python, port, key), hosts)))
    for host, f in facts.items():
        if "error" in f:
            print(f"host {host}: unreachable or not runnable")
        else:
            print(f"host {host}: hostname {f['hostname']}, Python {f['python']}, Horovod {_show(f['horovod'])} "
                  f"({_show(f['build'])}), torch {_show(f['torch'])}, TensorFlow {_show(f['tensorflow'])}, "
                  f"interfaces {', '.join(f['interfaces'])}")
    found = twice + problems_of(facts, python, iface, port, key)
    for problem in found:
        print(f"problem: {problem}")
    print("doctor: OK" if not found else f"doctor: {len(found)} problem(s)", flush=True)
    return 1 if found else 0
