#!/usr/bin/env python3
"""Host discovery for elastic Horovod: print the hosts listed in a hosts file, one ``host:slots`` a line.

An operator adds or drains hosts by editing the file; horovodrun runs this script every few seconds.

    horovodrun -np 2 --min-np 1 --max-np 4 --host-discovery-script "mpi/discover_hosts.py /etc/hvd/hosts" ...

The hosts file: one ``host`` or ``host:slots`` per line (slots default 1), ``#`` comments and blank
lines allowed. The path comes from the first argument, else $HVDKIT_HOSTS_FILE.
Exit codes: 0 printed the hosts (an empty file prints nothing on purpose: the job keeps waiting for
hosts, up to horovodrun's --elastic-timeout); 1 a malformed line; 2 no such file.
"""
import os
import re
import sys

# A DNS name or an IPv4 address; IPv6 literals are not accepted by horovodrun's host:slots syntax.
HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse(text, path="hosts file"):
    """[(host, slots)] from the file's text; raises ValueError naming the first bad line."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(":")
        host, slots = host.strip(), slots.strip()
        if not HOST.match(host) or (re.fullmatch(r"[\d.]+", host) and not _ipv4(host)):
            raise ValueError(f"{path}:{number}: {raw.strip()!r} is not a host name or IPv4 address; "
                             "write one host or host:slots per line")
        if slots and not (slots.isdigit() and int(slots) >= 1):
            raise ValueError(f"{path}:{number}: slots in {raw.strip()!r} must be a whole number >= 1")
        hosts.append((host, int(slots) if slots else 1))
    return hosts


def _ipv4(text):
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts)


def main(argv):
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
    sys.exit(main(sys.argv))
