"""Facts the doctor reads in-process (no child process, no framework import): versions, cores,
memory, network interfaces and launchers.

Example::

    >>> package_version("numpy")                  # from metadata: importing torch/TF takes seconds
    '2.1.3'
    >>> network_facts()["single_host_iface"]      # the interface single-host horovodrun uses
    'lo'
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

# Distributions that provide each import name (tensorflow-cpu installs `tensorflow`).
DISTRIBUTIONS = {"torch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos",
                                                      "tf-nightly"),
                 "keras": ("keras",), "mpi4py": ("mpi4py",), "horovod": ("horovod",)}


def package_version(name: str) -> Optional[str]:
    """Installed version from metadata, without importing the package (torch/TF imports take seconds)."""
    for dist in DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


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


def _interfaces() -> Tuple[Dict[str, List[str]], str]:
    """({interface: [IPv4 addresses]}, where that came from)."""
    try:
        import socket

        import psutil  # horovodrun itself uses psutil, so this is the same view it has
        return ({name: [a.address for a in addrs if a.family == socket.AF_INET]
                 for name, addrs in psutil.net_if_addrs().items()}, "psutil")
    except Exception:  # no usable psutil: ask the kernel, one interface at a time
        pass
    try:
        return {name: _ipv4_ioctl(name) for name in sorted(os.listdir("/sys/class/net"))}, "/sys/class/net"
    except OSError:
        return {}, "unavailable"


def network_facts() -> Dict[str, Any]:
    """Interfaces with their IPv4 addresses, and the one Gloo would use.

    horovodrun on local hosts only uses the interfaces that hold 127.0.0.1 (the loopback);
    across hosts it probes for common routed interfaces, unless HOROVOD_GLOO_IFACE / --network-interface
    names one.
    """
    interfaces, source = _interfaces()
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
