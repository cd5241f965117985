#!/usr/bin/env python3
"""Pretend cluster on one machine: N worker "hosts" and a launcher, each a network namespace on a private bridge.

Each worker namespace runs its own sshd under its own UTS namespace (hostname ``hvdkit-h1``, ``hvdkit-h2``, ...);
the launcher namespace is where ``horovodrun``/``mpirun`` run (as ``hvdkit-launcher``). Every namespace has one
interface, ``eth0``, on the subnet 10.213.0.0/24, which exists only on the bridge: no address in the root
namespace, no NAT, no default route, so no traffic leaves. Hosts share the root filesystem, so the same venv and
working directory exist everywhere, as on a cluster with a shared home. Run as root::

    python3 mpi/netns_hosts.py up --hosts 2        # idempotent; prints the hosts, the key and example commands
    python3 mpi/netns_hosts.py run -- .venv/bin/hvdkit launch --hostfile /tmp/hvdkit-netns/hostfile \\
        --network-interface eth0 --ssh-identity-file /tmp/hvdkit-netns/id_ed25519 examples/torch_digits.py
    python3 mpi/netns_hosts.py run --on hvdkit-h1 -- hostname    # a command on a worker host
    python3 mpi/netns_hosts.py down                # removes everything, also after a failed `up`

``--prefix P`` names a separate set (``P-h1``, ``P-l``, bridge ``P-br0``, links ``P-v1``) with a state directory
of its own (default /tmp/P-netns), so two sets can be up at once, e.g. a test's next to a user's, and one's
``up``/``down`` never reads the other's state. Each sshd listens on ports 22 and 2222 (``SSH_PORTS``) and logs each
connection with the port it came in on (``sshd-<host>.log``), so a launch's ``--ssh-port`` can be checked.

Nothing of the user's is touched: the ssh key, sshd host key, authorized_keys and known_hosts are throwaway files
in the state directory (default /tmp/hvdkit-netns, or $HVDKIT_NETNS_STATE; ``--state DIR``). Name resolution and
ssh client defaults come from ``/etc/netns/<namespace>/{hosts,ssh}``, which ``ip netns exec`` bind-mounts over
``/etc/hosts`` and ``/etc/ssh`` inside that namespace only; /etc/hosts and ~/.ssh stay as they are. The ssh client
config there sets known_hosts and host-key checking for these hosts but no identity: launchers must be given the key
(``--ssh-identity-file``), as on a real cluster with a dedicated key.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

PREFIX = "hvdkit"                   # of every name made; --prefix chooses another (a separate set)
SUBNET = "10.213.0"                 # /24, only on each set's bridge (sets do not see each other)
LAUNCHER_IP = f"{SUBNET}.1"
SSH_PORTS = (22, 2222)              # every sshd listens on both: tests use the second for --ssh-port
STATE_ENV = "HVDKIT_NETNS_STATE"    # the default set's state directory (default /tmp/hvdkit-netns)
ETC_NETNS = "/etc/netns"
SAFE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
READY_TIMEOUT = 15.0                # seconds for every sshd to accept a login


class SetupError(Exception):
    """A problem with a fix: printed as one ``netns_hosts: error: ...`` line."""


class StateInUse(SetupError):
    """The state directory holds another prefix's set: refused before anything is touched (nothing to undo)."""


def default_state(prefix: str = PREFIX) -> str:
    """Each prefix's own state directory, so a set never reads (and tears down) another's state.

    >>> default_state("x") == os.path.join(os.path.dirname(default_state()), "x-netns")
    True
    """
    base = os.environ.get(STATE_ENV, "/tmp/hvdkit-netns")
    return base if prefix == PREFIX else os.path.join(os.path.dirname(os.path.abspath(base)), f"{prefix}-netns")


def check_prefix(prefix: str) -> None:
    """Names are ``<prefix>-...``; Linux limits link names to 15 characters (``<prefix>-br0``, ``<prefix>-v50``)."""
    if not (prefix[:1].isalpha() and prefix.isalnum() and prefix.islower() and len(prefix) <= 8):
        raise SetupError(f"--prefix {prefix!r} must be 1-8 lowercase letters and digits, starting with a letter")


def host_name(i: int, prefix: str = PREFIX) -> str:
    return f"{prefix}-h{i}"


def bridge_name(prefix: str = PREFIX) -> str:
    return f"{prefix}-br0"


def launcher_ns(prefix: str = PREFIX) -> str:
    return f"{prefix}-l"


def host_ip(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def layout(n: int, prefix: str = PREFIX) -> List[Dict[str, str]]:
    """Namespace, hostname, address and root-side veth of the launcher and each worker.

    >>> [(h["name"], h["veth"]) for h in layout(2)]
    [('hvdkit-launcher', 'hvdkit-vl'), ('hvdkit-h1', 'hvdkit-v1'), ('hvdkit-h2', 'hvdkit-v2')]
    """
    nodes = [dict(ns=launcher_ns(prefix), name=f"{prefix}-launcher", ip=LAUNCHER_IP, veth=f"{prefix}-vl",
                  role="launcher")]
    for i in range(1, n + 1):
        nodes.append(dict(ns=host_name(i, prefix), name=host_name(i, prefix), ip=host_ip(i), veth=f"{prefix}-v{i}",
                          role="worker"))
    return nodes


def sh(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run a setup command quietly; on failure raise SetupError with its stderr."""
    res = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SAFE_ENV,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


# ---- state -------------------------------------------------------------------------------------------------

def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, "state.json")


def load_state(state_dir: str) -> Optional[dict]:
    try:
        with open(state_path(state_dir)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def save_state(state_dir: str, state: dict) -> None:
    tmp = state_path(state_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, state_path(state_dir))


# ---- checks ------------------------------------------------------------------------------------------------

def check_can_run() -> None:
    """Raise SetupError naming the first missing prerequisite (all are needed before anything is created)."""
    if os.geteuid() != 0:
        raise SetupError("must run as root (network namespaces and sshd); re-run with sudo")
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client"), ("sshd", "openssh-server")):
        if not shutil.which(tool, path=SAFE_ENV["PATH"]):
            raise SetupError(f"{tool} not found; install {package} (bash mpi/setup.sh does, as root)")
    probe = f"{PREFIX}-probe{os.getpid()}"
    res = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if res.returncode != 0:
        raise SetupError(f"cannot create network namespaces ({res.stderr.strip()}); "
                         "run on a host or container with CAP_SYS_ADMIN and CAP_NET_ADMIN")


# ---- up ----------------------------------------------------------------------------------------------------

def healthy(state: dict) -> bool:
    """Every namespace exists and every sshd is alive."""
    names = set(sh("ip", "netns", "list", check=False).stdout.split())
    for node in state.get("nodes", []):
        if node["ns"] not in names:
            return False
    for ns, pid in state.get("sshd_pids", {}).items():
        if not is_our_sshd(pid, sshd_conf(state.get("state_dir", ""), ns)):
            return False
    return bool(state.get("ready"))


def up(n: int, state_dir: str, prefix: str = PREFIX) -> dict:
    """Create (or keep, when already up with ``n`` hosts) the namespaces, bridge, sshds, keys and name files."""
    check_prefix(prefix)
    if n < 1:
        raise SetupError(f"--hosts must be >= 1 (got {n}); pass e.g. --hosts 2")
    if n > 50:
        raise SetupError(f"--hosts {n} is more than 50; the subnet plan holds 50 hosts")
    check_can_run()
    old = load_state(state_dir)
    if old and old.get("prefix", prefix) != prefix:
        raise StateInUse(f"--state {state_dir} holds the set {old['prefix']!r}; give --prefix {prefix} a state "
                         f"directory of its own (default {default_state(prefix)})")
    if old and (old.get("hosts"), old.get("prefix"), old.get("ssh_ports")) == (n, prefix, list(SSH_PORTS)) \
            and healthy(old):
        return old
    down(state_dir, quiet=True, prefix=prefix)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    nodes = layout(n, prefix)
    # Recorded before anything exists, so `down` can undo a half-done `up`.
    state = dict(hosts=n, prefix=prefix, state_dir=state_dir, nodes=nodes, bridge=bridge_name(prefix),
                 ssh_ports=list(SSH_PORTS), sshd_pids={}, ready=False,
                 made_etc_netns=not os.path.isdir(ETC_NETNS), made_run_sshd=not os.path.isdir("/run/sshd"),
                 key=os.path.join(state_dir, "id_ed25519"), hostfile=os.path.join(state_dir, "hostfile"))
    save_state(state_dir, state)
    _keys(state_dir)
    _etc_files(nodes, state_dir, prefix)
    _network(nodes, state["bridge"])
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege separation directory
    for node in nodes[1:]:
        state["sshd_pids"][node["ns"]] = _start_sshd(node, state_dir)
        save_state(state_dir, state)
    _wait_ready(nodes[0], nodes[1:], state["key"])
    with open(state["hostfile"], "w") as f:
        f.write("".join(f"{node['name']} slots=1\n" for node in nodes[1:]))
    state["ready"] = True
    save_state(state_dir, state)
    return state


def _keys(state_dir: str) -> None:
    """A client key (what launchers pass with --ssh-identity-file) and one sshd host key, both throwaway."""
    for name in ("id_ed25519", "ssh_host_ed25519_key"):
        path = os.path.join(state_dir, name)
        if not os.path.exists(path):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{PREFIX}-netns", "-f", path)
    shutil.copyfile(os.path.join(state_dir, "id_ed25519.pub"), os.path.join(state_dir, "authorized_keys"))
    os.chmod(os.path.join(state_dir, "authorized_keys"), 0o600)


def _etc_files(nodes: List[Dict[str, str]], state_dir: str, prefix: str) -> None:
    """/etc/netns/<ns>/hosts (every hostname) and /etc/netns/<ns>/ssh (client defaults), per namespace."""
    with open("/etc/hosts") as f:
        base = f.read()
    names = "".join(f"{node['ip']}\t{node['name']}\n" for node in nodes)
    ours = (f"# hvdkit netns hosts: the key is given by the launcher (-i / --ssh-identity-file)\n"
            f"Host {prefix}-* {SUBNET}.*\n"
            f"    UserKnownHostsFile {state_dir}/known_hosts\n"
            f"    StrictHostKeyChecking no\n"
            f"    LogLevel ERROR\n"
            f"    ConnectTimeout 5\n"
            # A host cut off the network leaves horovodrun's ssh to it silent, not closed: without these the
            # elastic driver waits for that worker forever (TCP keepalive: hours). With them ssh gives up after
            # 3 unanswered probes 2 s apart, the driver sees the worker fail and blacklists its host.
            f"    ServerAliveInterval 2\n"
            f"    ServerAliveCountMax 3\n\n")
    try:
        with open("/etc/ssh/ssh_config") as f:
            system_config = f.read()
    except OSError:
        system_config = ""
    for node in nodes:
        etc = os.path.join(ETC_NETNS, node["ns"])
        os.makedirs(os.path.join(etc, "ssh"), exist_ok=True)
        with open(os.path.join(etc, "hosts"), "w") as f:
            f.write(base.rstrip("\n") + f"\n# {prefix} netns hosts\n" + names)
        # The first value ssh reads wins, so ours come before the system's (its Include finds nothing here).
        with open(os.path.join(etc, "ssh", "ssh_config"), "w") as f:
            f.write(ours + system_config)


def _network(nodes: List[Dict[str, str]], bridge: str) -> None:
    sh("ip", "link", "add", bridge, "type", "bridge")
    sh("ip", "link", "set", bridge, "up")
    for node in nodes:
        ns = node["ns"]
        sh("ip", "netns", "add", ns)
        # The namespace end is created inside it, already named eth0, as on a real host.
        sh("ip", "link", "add", node["veth"], "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", node["veth"], "master", bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{node['ip']}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def sshd_conf(state_dir: str, ns: str) -> str:
    return os.path.join(state_dir, f"sshd-{ns}.conf")


def is_our_sshd(pid: int, conf: str) -> bool:
    """Is ``pid`` still the sshd started with ``conf``? A pid from an old state file may since name another process.

    sshd's listener rewrites its title but keeps its arguments in it ("sshd: /usr/sbin/sshd -f CONF ... [listener]").
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().replace(b"\0", b" ").decode(errors="replace").split()
    except (OSError, TypeError, ValueError):
        return False
    return any(os.path.basename(w).startswith("sshd") for w in words[:2]) and conf in words


def _start_sshd(node: Dict[str, str], state_dir: str) -> int:
    """sshd in the worker's namespace under its own hostname; returns its pid (it daemonizes)."""
    conf = sshd_conf(state_dir, node["ns"])
    pidfile = os.path.join(state_dir, f"sshd-{node['ns']}.pid")
    with open(conf, "w") as f:
        f.write(f"ListenAddress {node['ip']}\n" + "".join(f"Port {port}\n" for port in SSH_PORTS) +
                # VERBOSE logs "Connection from A port P on B port 2222": which port each login used
                "LogLevel VERBOSE\n"
                f"HostKey {state_dir}/ssh_host_ed25519_key\n"
                f"AuthorizedKeysFile {state_dir}/authorized_keys\n"
                f"PidFile {pidfile}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                # no PAM (containers rarely have a working one); the state dir is in /tmp: skip owner checks
                "UsePAM no\nStrictModes no\nPrintMotd no\nPrintLastLog no\n"
                # horovodrun and mpirun open many sessions at once
                "MaxStartups 200\nMaxSessions 200\n"
                "Subsystem sftp internal-sftp\n")
    if os.path.exists(pidfile):
        os.remove(pidfile)
    sh("ip", "netns", "exec", node["ns"], "unshare", "--uts", "sh", "-c",
       'hostname "$0" && exec /usr/sbin/sshd -f "$1" -E "$2"', node["name"], conf,
       os.path.join(state_dir, f"sshd-{node['ns']}.log"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise SetupError(f"sshd in {node['ns']} did not start; see {state_dir}/sshd-{node['ns']}.log")


def _wait_ready(launcher: Dict[str, str], workers: List[Dict[str, str]], key: str) -> None:
    """Log in to every worker from the launcher namespace by name: checks routes, names, keys and hostnames."""
    deadline = time.monotonic() + READY_TIMEOUT
    for node in workers:
        while True:
            res = sh(*in_namespace(launcher["ns"], launcher["name"], ["ssh", "-i", key, "-o", "BatchMode=yes",
                                                                      node["name"], "hostname"]), check=False)
            if res.returncode == 0 and res.stdout.strip() == node["name"]:
                break
            if time.monotonic() > deadline:
                raise SetupError(f"cannot ssh to {node['name']} from {launcher['ns']}: "
                                 f"{(res.stderr or res.stdout).strip()}")
            time.sleep(0.1)


# ---- run ---------------------------------------------------------------------------------------------------

def in_namespace(ns: str, hostname: str, cmd: List[str]) -> List[str]:
    """argv running ``cmd`` in namespace ``ns`` (its /etc/netns files mounted) under hostname ``hostname``.

    >>> in_namespace("hvdkit-l", "hvdkit-launcher", ["true"])[:4]
    ['ip', 'netns', 'exec', 'hvdkit-l']
    """
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && shift && exec "$@"',
            hostname, "--", *cmd]


def run_argv(state_dir: str, cmd: List[str], on: Optional[str] = None) -> List[str]:
    state = load_state(state_dir)
    if not state or not state.get("ready"):
        raise SetupError(f"no hosts are up (state {state_dir}); run: python3 mpi/netns_hosts.py up --hosts 2")
    if not cmd:
        raise SetupError("run needs a command after --, e.g. run -- hostname")
    nodes = {node["name"]: node for node in state["nodes"]}
    node = nodes.get(on or state["nodes"][0]["name"])     # the launcher's by default
    if node is None:
        raise SetupError(f"no host {on!r}; choose one of {', '.join(nodes)}")
    return in_namespace(node["ns"], node["name"], cmd)


# ---- down --------------------------------------------------------------------------------------------------

def down(state_dir: str, quiet: bool = False, prefix: str = PREFIX) -> None:
    """Remove everything `up` made (from the state file, else by the prefix's names): processes in the namespaces,
    namespaces, bridge and veths, /etc/netns files, the state directory with its keys. Safe to repeat."""
    state = load_state(state_dir) or {}
    prefix = state.get("prefix", prefix)
    listed = set(sh("ip", "netns", "list", check=False).stdout.split())
    ours = {node["ns"] for node in state.get("nodes", [])}
    ours |= {ns for ns in listed if ns == launcher_ns(prefix) or
             (ns.startswith(f"{prefix}-h") and ns[len(prefix) + 2:].isdigit())}
    for ns, pid in state.get("sshd_pids", {}).items():
        if is_our_sshd(pid, sshd_conf(state.get("state_dir", state_dir), ns)):   # else gone, its pid maybe reused
            _kill(pid)
    for ns in sorted(ours):
        if ns in listed:
            for _ in range(3):     # processes may fork while being killed (a launch in progress)
                pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    _kill(int(pid))
                time.sleep(0.05)
            sh("ip", "netns", "del", ns, check=False)     # takes the namespace's veth ends, and their peers
        shutil.rmtree(os.path.join(ETC_NETNS, ns), ignore_errors=True)
    for node in state.get("nodes", []):
        sh("ip", "link", "del", node["veth"], check=False)
    sh("ip", "link", "del", bridge_name(prefix), check=False)
    if state.get("made_etc_netns"):
        _rmdir(ETC_NETNS)
    if state.get("made_run_sshd"):
        _rmdir("/run/sshd")
    if os.path.isdir(state_dir) and (state or os.path.basename(state_dir.rstrip("/")).startswith(f"{prefix}-netns")):
        shutil.rmtree(state_dir, ignore_errors=True)
    if not quiet:
        print(f"netns_hosts: down (namespaces {', '.join(sorted(ours)) or 'none'} removed)")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)          # only when empty: something else may use it meanwhile
    except OSError:
        pass


# ---- command line ------------------------------------------------------------------------------------------

def describe(state: dict) -> str:
    me = os.path.relpath(os.path.abspath(__file__))
    workers = [node for node in state["nodes"] if node["role"] == "worker"]
    lines = ["netns_hosts: up: " + ", ".join(f"{node['name']} ({node['ip']})" for node in workers)
             + f"; launcher {state['nodes'][0]['name']} ({LAUNCHER_IP}); interface eth0; "
             f"ssh ports {', '.join(map(str, state.get('ssh_ports', SSH_PORTS)))}",
             f"  key:      {state['key']}",
             f"  hostfile: {state['hostfile']}",
             f"  try:      python3 {me} run -- ssh -i {state['key']} {workers[0]['name']} hostname",
             f"  launch:   python3 {me} run -- .venv/bin/hvdkit launch --hostfile {state['hostfile']} "
             f"--network-interface eth0 --ssh-identity-file {state['key']} examples/torch_digits.py --epochs 3",
             f"  remove:   python3 {me} --state {state['state_dir']} down"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="netns_hosts.py", description=__doc__.splitlines()[0])
    parser.add_argument("--state", default=None, help="state directory (default /tmp/<prefix>-netns: "
                        f"/tmp/hvdkit-netns for the default prefix, or ${STATE_ENV})")
    parser.add_argument("--prefix", default=PREFIX, help=f"of every name made: a separate set (default {PREFIX})")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="create N worker hosts and the launcher namespace (idempotent)")
    p_up.add_argument("--hosts", type=int, default=2)
    p_up.add_argument("--json", action="store_true", help="print the state as JSON")
    sub.add_parser("down", help="remove everything up created")
    sub.add_parser("status", help="print the state; exit 1 when not up")
    p_run = sub.add_parser("run", help="run a command in the launcher namespace (or --on HOST)")
    p_run.add_argument("--on", default=None, help="a worker's hostname, e.g. hvdkit-h1")
    p_run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        check_prefix(args.prefix)    # before it names a state directory (a prefix "../x" must name none)
    except SetupError as e:
        print(f"netns_hosts: error: {e}", file=sys.stderr)
        return 2
    state_dir = os.path.abspath(args.state or default_state(args.prefix))
    try:
        if args.command == "up":
            state = up(args.hosts, state_dir, args.prefix)
            print(json.dumps(state) if args.json else describe(state), flush=True)
        elif args.command == "down":
            if os.geteuid() != 0:
                raise SetupError("must run as root; re-run with sudo")
            down(state_dir, prefix=args.prefix)
        elif args.command == "status":
            state = load_state(state_dir)
            if not state or not healthy(state):
                print(f"netns_hosts: not up (state {state_dir})")
                return 1
            print(describe(state))
        else:
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            argv_ = run_argv(state_dir, cmd, args.on)
            os.execvp(argv_[0], argv_)
    except SetupError as e:
        print(f"netns_hosts: error: {e}", file=sys.stderr)
        if args.command == "up" and not isinstance(e, StateInUse):     # leave nothing half-made behind
            down(state_dir, quiet=True, prefix=args.prefix)
        return 2
    except subprocess.TimeoutExpired as e:
        print(f"netns_hosts: error: {' '.join(e.cmd)} timed out; check the machine and re-run", file=sys.stderr)
        if args.command == "up":
            down(state_dir, quiet=True, prefix=args.prefix)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
