"""Host discovery for elastic Horovod: print the hosts listed in a hosts file, one ``host:slots`` a line.

An operator adds or drains hosts by editing the file; horovodrun runs this command every second or so.
It lives in the package (not beside it) so it works from any install, editable or not::

    horovodrun -np 2 --min-np 1 --max-np 4 --gloo \\
        --host-discovery-script "python -m hvdkit.discover_hosts /etc/hvd/hosts" ...
    hvdkit-discover-hosts /etc/hvd/hosts          # the same, as a console script

    >>> parse("node1:4\\n# drained: node2\\n10.0.0.7\\n")
    [('node1', 4), ('10.0.0.7', 1)]

The hosts file: one ``host`` or ``host:slots`` per line (slots default 1), ``#`` comments and blank
lines allowed. The path comes from the first argument, else $HVDKIT_HOSTS_FILE.
Exit codes: 0 printed the hosts (an empty file prints nothing on purpose: the job keeps waiting for
hosts, up to horovodrun's --elastic-timeout); 1 a malformed line; 2 no such file.

Standard library only: it runs every second on the launching host, so it must start fast and
must not import a framework.
"""
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

# A DNS name or an IPv4 address; IPv6 literals are not accepted by horovodrun's host:slots syntax.
HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                  r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse(text: str, path: str = "hosts file") -> List[Tuple[str, int]]:
    """[(host, slots)] from the file's text; raises ValueError naming the first bad line."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(":")
        host, slots = host.strip(), slots.strip()
        if not valid_host(host):
            raise ValueError(f"{path}:{number}: {raw.strip()!r} is not a host name or IPv4 address; "
                             "write one host or host:slots per line")
        if slots and not (slots.isdigit() and int(slots) >= 1):
            raise ValueError(f"{path}:{number}: slots in {raw.strip()!r} must be a whole number >= 1")
        hosts.append((host, int(slots) if slots else 1))
    return hosts


def valid_host(host: str) -> bool:
    """A DNS name or an IPv4 address (all-digit-and-dot names match HOST too, so "999.1.2.3" is range-checked).

    >>> valid_host("node-1.example"), valid_host("10.0.0.1"), valid_host("999.1.2.3"), valid_host("node 1")
    (True, True, False, False)
    """
    return bool(HOST.match(host)) and not (re.fullmatch(r"[\d.]+", host) and not _ipv4(host))


def _ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the hosts of the file named by ``argv[1]`` (default: sys.argv) or $HVDKIT_HOSTS_FILE."""
    argv = sys.argv if argv is None else argv
    path = argv[1] if len(argv) > 1 else os.environ.get("HVDKIT_HOSTS_FILE")
    if not path:
        print("discover_hosts: no hosts file; pass its path or set HVDKIT_HOSTS_FILE", file=sys.stderr)
        return 2
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        print(f"discover_hosts: cannot read hosts file {path} ({e.strerror}); create it with one host:slots per line",
              file=sys.stderr)
        return 2
    try:
        hosts = parse(text, path)
    except ValueError as e:
        print(f"discover_hosts: {e}", file=sys.stderr)
        return 1
    if not hosts:
        print(f"discover_hosts: {path} lists no hosts; the job waits for hosts (up to --elastic-timeout)",
              file=sys.stderr)
    for host, slots in hosts:
        print(f"{host}:{slots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
