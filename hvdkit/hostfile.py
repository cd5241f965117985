"""Static hostfiles for ``hvdkit launch --hostfile``: Horovod's and OpenMPI's formats, read into ``host:slots``.

One host a line, ``#`` comments and blank lines allowed; each line one of::

    node1                  # 1 slot
    node1:4                # Horovod's -H style
    node1 slots=4          # OpenMPI's (and horovodrun --hostfile's); max_slots=N is accepted and ignored

>>> parse("node1 slots=2 max_slots=4\\nnode2:2\\n# spare\\nnode3\\n")
[('node1', 2), ('node2', 2), ('node3', 1)]
>>> hosts_arg([("node1", 2), ("node2", 2)])
'node1:2,node2:2'
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from .discover_hosts import valid_host
from .errors import HvdkitError

_OPTION = re.compile(r"^(slots|max_slots|max-slots)=(\S+)$")


def parse(text: str, path: str = "hostfile") -> List[Tuple[str, int]]:
    """[(host, slots)]; raises ValueError naming the first bad line and the formats accepted."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path}:{number}: {raw.strip()!r}"
        host, _, slots = words[0].partition(":")
        for word in words[1:]:
            option = _OPTION.match(word)
            if not option or slots and option.group(1) == "slots":
                raise ValueError(f"{where} is not 'host', 'host:slots' or 'host slots=N'; fix that line")
            if option.group(1) == "slots":
                slots = option.group(2)
        if not valid_host(host):
            raise ValueError(f"{where}: {host!r} is not a host name or IPv4 address; fix that line")
        if slots and not (slots.isdigit() and int(slots) >= 1):
            raise ValueError(f"{where}: slots must be a whole number >= 1; fix that line")
        hosts.append((host, int(slots) if slots else 1))
    # a host listed twice: its slots add up, as OpenMPI counts them (Horovod would give it two sets of local ranks)
    merged = {}
    for host, slots in hosts:
        merged[host] = merged.get(host, 0) + slots
    return list(merged.items())


def read(path: str) -> List[Tuple[str, int]]:
    """:func:`parse` a file; every problem is one :class:`HvdkitError` naming the file and the fix."""
    try:
        with open(path) as f:
            hosts = parse(f.read(), path)
    except FileNotFoundError:
        raise HvdkitError(f"hostfile {path} not found; create it with one 'host slots=N' line per host") from None
    except OSError as e:
        raise HvdkitError(f"cannot read hostfile {path} ({e.strerror}); pass a readable file with --hostfile") \
            from None
    except ValueError as e:
        raise HvdkitError(str(e)) from None
    if not hosts:
        raise HvdkitError(f"hostfile {path} lists no hosts; add one 'host slots=N' line per host")
    return hosts


def hosts_arg(hosts: List[Tuple[str, int]]) -> str:
    """The ``-H`` value both launchers take."""
    return ",".join(f"{host}:{slots}" for host, slots in hosts)


def total_slots(hosts_value: str) -> int:
    """Slots in a ``-H`` value (a host without ``:N`` counts 1); a bad item is one :class:`HvdkitError` line (both
    launchers would otherwise get ``-np 1`` and fail later, or start ranks on a host named ``a:x``).

    >>> total_slots("a:2,b")
    3
    """
    total = 0
    for item in hosts_value.split(","):
        host, colon, slots = item.strip().partition(":")
        if not host or colon and not (slots.isdigit() and int(slots) >= 1):
            raise HvdkitError(f"-H {hosts_value}: {item.strip()!r} is not 'host' or 'host:N' with N a whole number "
                              ">= 1; fix it, e.g. -H node1:2,node2:2")
        total += int(slots) if colon else 1
    return total


# ---- hosts a scheduler gives: SLURM's allocation, an injected OpenMPI hostfile --------------------------------

def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list, expanded in order (zero padding kept, several bracket groups allowed).

    >>> expand_nodelist("node[1-3,7],gpu[08-10]-ib,login")
    ['node1', 'node2', 'node3', 'node7', 'gpu08-ib', 'gpu09-ib', 'gpu10-ib', 'login']
    """
    names: List[str] = []
    for item in _split_top(nodelist):
        found = re.search(r"\[([^\]]*)\]", item)
        if not found:
            names.append(item)
            continue
        head, tail = item[:found.start()], item[found.end():]
        for part in found.group(1).split(","):
            low, _, high = part.partition("-")
            if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
                raise HvdkitError(f"SLURM node list {nodelist!r}: bad range {part!r}; "
                                  "expected e.g. node[1-3,5]")
            for number in range(int(low), int(high or low) + 1):
                names += expand_nodelist(f"{head}{number:0{len(low)}d}{tail}")
    return names


def _split_top(text: str) -> List[str]:
    """Split at commas outside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item.strip() for item in items + [current] if item.strip()]


def slurm_hosts(env: Dict[str, str]) -> Optional[List[Tuple[str, int]]]:
    """(host, slots) of the SLURM allocation in ``env`` (None outside one): SLURM_JOB_NODELIST with
    SLURM_NTASKS_PER_NODE (one number), else SLURM_TASKS_PER_NODE ("2(x3),1"), else one slot per node.

    >>> slurm_hosts({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"})
    [('n1', 2), ('n2', 2), ('n3', 1)]
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    nodes = expand_nodelist(nodelist)
    per_node = env.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit():
        counts = [int(per_node)] * len(nodes)
    elif env.get("SLURM_TASKS_PER_NODE"):
        counts = []
        for part in env["SLURM_TASKS_PER_NODE"].split(","):
            found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not found:
                raise HvdkitError(f"SLURM_TASKS_PER_NODE {env['SLURM_TASKS_PER_NODE']!r} is not like '2(x3),1'; "
                                  "check the allocation or pass --hostfile")
            counts += [int(found.group(1))] * int(found.group(2) or 1)
    else:
        counts = [1] * len(nodes)
    if len(counts) != len(nodes):
        raise HvdkitError(f"SLURM gives {len(nodes)} node(s) but {len(counts)} task count(s); "
                          "check SLURM_TASKS_PER_NODE or pass --hostfile")
    return list(zip(nodes, counts))


def _injected_hosts(path: str) -> List[Tuple[str, int]]:
    """:func:`read` the injected hostfile; a problem names the variable, which may be left over from another job
    (an exported shell setting, a reused container), so the user knows what to unset."""
    try:
        return read(path)
    except HvdkitError as e:
        problem = str(e).split("; ")[0]
        raise HvdkitError(f"OMPI_MCA_orte_default_hostfile={path}: {problem}; unset OMPI_MCA_orte_default_hostfile "
                          "if it is left over, or say where to run with --hostfile FILE or -H host:N") from None


def scheduler_hosts(env: Dict[str, str]) -> Optional[Tuple[List[Tuple[str, int]], str]]:
    """Hosts given by the environment and where they came from, or None: an OpenMPI hostfile injected by
    Kubernetes' MPI Operator (OMPI_MCA_orte_default_hostfile), else a SLURM allocation."""
    injected = env.get("OMPI_MCA_orte_default_hostfile")
    if injected:
        return _injected_hosts(injected), f"OMPI_MCA_orte_default_hostfile={injected}"
    hosts = slurm_hosts(env)
    if hosts:
        return hosts, "the SLURM allocation (SLURM_JOB_NODELIST)"
    return None
