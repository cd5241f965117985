"""Several "hosts" on this machine for tests: network namespaces with sshd (mpi/netns_hosts.py), once per module.

Use it from a test module::

    import multihost
    netns_hosts = multihost.netns_hosts   # the fixture, for this module

    def test_hostname(netns_hosts):
        result = netns_hosts.run(["ssh", "-i", netns_hosts.key, "hvdkit-h1", "hostname"], timeout=30)
        assert result.stdout.strip() == "hvdkit-h1"

Its hosts are hvdkit-h1, hvdkit-h2, ...; ``hosts_fixture(prefix="x")`` makes a fixture of a separate set (x-h1, ...:
its own namespaces, bridge, links and state) that can be up at the same time. A fixture skips the module with one
reason when it cannot run here (not root, no ``ip netns``, no sshd), and removes everything it made (processes,
namespaces, links, keys, /etc/netns files) in a finally, also when a test or the setup fails. Commands run in the
launcher namespace through :func:`proc.run`: their own session, a timeout, the group and every marked worker (remote
ones too: the launchers forward HVDKIT_*) killed after.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence

import pytest

from proc import REPO, run

SCRIPT = os.path.join(REPO, "mpi", "netns_hosts.py")
HOSTS = 3   # two for static jobs, a third an elastic job grows onto (up: ~2 s)
UP_TIMEOUT = 60


def _netns_module():
    """mpi/netns_hosts.py as a module (mpi/ is not a package)."""
    spec = importlib.util.spec_from_file_location("netns_hosts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def skip_reason() -> Optional[str]:
    """Why namespace hosts cannot run here, or None."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces, sshd)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"multi-host tests need {tool} (apt-get install iproute2 openssh-client)"
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        return "multi-host tests need sshd (bash mpi/setup.sh installs openssh-server)"
    try:
        _netns_module().check_can_run()
    except Exception as e:  # SetupError: no netns here
        return f"multi-host tests cannot create network namespaces here: {e}"
    return None


@dataclasses.dataclass
class NetnsHosts:
    """Hosts that are up: ``names`` (hvdkit-h1, ...), ``key`` (their ssh key), ``hostfile`` ("host slots=1")."""
    state: Dict
    netns: object   # the netns_hosts module

    @property
    def names(self) -> List[str]:
        return [node["name"] for node in self.state["nodes"] if node["role"] == "worker"]

    @property
    def key(self) -> str:
        return self.state["key"]

    @property
    def hostfile(self) -> str:
        return self.state["hostfile"]

    @property
    def ssh_ports(self) -> List[int]:
        """The ports every sshd listens on (22 and another, for ``--ssh-port``)."""
        return self.state["ssh_ports"]

    def sshd_log(self, name: str) -> str:
        """Host ``name``'s sshd log (LogLevel VERBOSE: ``Connection from A port P on B port N`` per login)."""
        ns = next(node["ns"] for node in self.state["nodes"] if node["name"] == name)
        return os.path.join(self.state["state_dir"], f"sshd-{ns}.log")

    def veth(self, name: str) -> str:
        """The root-namespace end of host ``name``'s link: ``ip link set VETH down`` cuts the host off the network
        (its processes keep running)."""
        return next(node["veth"] for node in self.state["nodes"] if node["name"] == name)

    def argv(self, cmd: Sequence[str], on: Optional[str] = None) -> List[str]:
        """``cmd`` wrapped to run in the launcher namespace (or on worker ``on``)."""
        return self.netns.run_argv(self.state["state_dir"], list(cmd), on)

    def run(self, cmd: Sequence[str], timeout: float = 180, env: Optional[Dict[str, str]] = None,
            on: Optional[str] = None) -> subprocess.CompletedProcess:
        """:func:`proc.run` in the launcher namespace: timeout, group and marked workers killed."""
        return run(self.argv(cmd, on), timeout=timeout, env=env)


def _down(state_dir: str, prefix: str) -> None:
    subprocess.run(["python3", SCRIPT, "--state", state_dir, "--prefix", prefix, "down"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=UP_TIMEOUT)


def hosts_fixture(prefix: str = "hvdkit", hosts: int = HOSTS, scope: str = "module"):
    """A fixture of :class:`NetnsHosts`: ``hosts`` workers named ``<prefix>-h1``..., up for ``scope``, then removed
    (also when the test or the setup fails). Distinct prefixes are distinct sets that can be up at once."""
    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory):
        reason = skip_reason()
        if reason:
            pytest.skip(reason)
        state_dir = str(tmp_path_factory.mktemp("netns") / f"{prefix}-netns")
        netns = _netns_module()
        try:
            up = subprocess.run(["python3", SCRIPT, "--state", state_dir, "--prefix", prefix, "up", "--hosts",
                                 str(hosts), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                timeout=UP_TIMEOUT)
            if up.returncode != 0:
                pytest.fail(f"netns_hosts.py up failed: {up.stderr.strip()}", pytrace=False)
            yield NetnsHosts(netns.load_state(state_dir), netns)
        finally:
            _down(state_dir, prefix)
    return fixture


netns_hosts = hosts_fixture()   # hvdkit-h1..h3, once per module that uses it
