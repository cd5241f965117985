"""``hvdkit`` command line: ``doctor`` (preflight), ``launch`` (run a script on N workers), ``audit``, ``bench``,
``checkpoint merge``.

Example::

    hvdkit doctor --json
    hvdkit doctor --hosts node1,node2 --ssh-identity-file ~/.ssh/hvd --network-interface eth0
    hvdkit launch -np 2 examples/torch_digits.py --epochs 3
    hvdkit launch --launcher mpirun -np 2 --print examples/torch_digits.py
    hvdkit launch -np 2 --hosts-file hosts.txt --max-np 4 examples/torch_digits.py     # elastic
    hvdkit launch --hostfile hosts --network-interface eth0 --ssh-identity-file ~/.ssh/hvd examples/torch_digits.py
    hvdkit launch -np 2 -- --timeline-filename /tmp/tl.json -- examples/torch_digits.py   # more launcher flags
    hvdkit audit results/audit --samples 1437 --epochs 3
    hvdkit checkpoint merge results/ckpt results/merged     # a sharded checkpoint as one ordinary file
    hvdkit bench -h

``hvdkit launch`` checks its input first (exit 2, one ``hvdkit: error: <problem>; <fix>`` line), then runs the
launcher under :mod:`hvdkit.supervise`: a failed job ends with one line naming the first failing rank and the
log file holding the full output (exit codes are listed there).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import hostfile
from .errors import HvdkitError, OneLineParser
from .hostfile import total_slots
from .launch import (CONTROLLERS, LAUNCHERS, Elastic, discovery_command, horovodrun_controller, launch_command,
                     preflight)

ELASTIC_FLAGS = ("min_np", "max_np", "elastic_timeout", "reset_limit")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hvdkit", description=__doc__.splitlines()[0])   # usage errors: one line
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check that this machine can run Horovod jobs")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--hosts", default=None, metavar="H1,H2",
                        help="check these hosts over ssh instead: reachable, same Python/Horovod, same interface")
    doctor.add_argument("--ssh-port", type=int, default=None, help="with --hosts: their ssh port")
    doctor.add_argument("--ssh-identity-file", default=None, metavar="KEY", help="with --hosts: the ssh key")
    doctor.add_argument("--network-interface", default=None, help="with --hosts: the NIC every host must have")
    launch = sub.add_parser("launch", help="run a Python script on N workers")
    launch.add_argument("--launcher", choices=LAUNCHERS, default="horovodrun")
    launch.add_argument("-np", "--num-proc", dest="np", type=int, default=None,
                        help="workers (default: the slots of --hostfile or -H, else 2)")
    launch.add_argument("-H", "--hosts", default=None, help="host1:slots,host2:slots (default localhost:NP)")
    launch.add_argument("--hostfile", default=None, metavar="FILE",
                        help="hosts for a static job: 'host slots=N' (OpenMPI), 'host:N' or 'host' lines")
    launch.add_argument("--controller", choices=CONTROLLERS, default=None,
                        help="horovodrun's controller: static jobs mpi (default: horovodrun runs mpirun; MPI tensor "
                             "ops, faster here) or gloo; elastic jobs gloo only")
    launch.add_argument("--network-interface", default=None,
                        help='the NIC ranks talk over, e.g. eth0 (elastic on one machine: "lo")')
    launch.add_argument("--ssh-port", type=int, default=None, help="ssh port of the remote hosts")
    launch.add_argument("--ssh-identity-file", default=None, metavar="KEY", help="ssh private key for the hosts")
    launch.add_argument("-x", "--env", dest="forward", action="append", default=[], metavar="NAME[=VALUE]",
                        help="pass a variable to every rank (repeatable); mpirun also gets HOROVOD_*, HVDKIT_*, "
                             "OMP_* for remote hosts, horovodrun passes its whole environment")
    launch.add_argument("--print", action="store_true",
                        help="print the command instead of running it (files are not checked)")
    launch.add_argument("--log", metavar="FILE", default=None,
                        help="write the launcher's full output here and keep it (default: a file in the temp "
                             "directory, named on failure, removed after success)")
    launch.add_argument("--verbose", action="store_true",
                        help="show the launcher's output unfiltered (its tracebacks and banners included)")
    elastic = launch.add_argument_group("elastic (horovodrun only)")
    elastic.add_argument("--hosts-file",
                         help="elastic: hosts come from this file (python -m hvdkit.discover_hosts reads it)")
    elastic.add_argument("--min-np", type=int, default=None, help="(default 1)")
    elastic.add_argument("--max-np", type=int, default=None)
    elastic.add_argument("--elastic-timeout", type=int, default=None, help="seconds (default 600)")
    elastic.add_argument("--reset-limit", type=int, default=None,
                         help="stop the job after this many resets (default: no limit)")
    launch.add_argument("script", nargs=argparse.REMAINDER,
                        help="script.py and its arguments; launcher flags hvdkit has no option for go first, "
                             "between two --: -- --timeline-filename t.json -- script.py")
    # Listed for the top-level help only: main() hands everything after "bench" to bench's own parser, which
    # argparse's REMAINDER cannot do when the first word is an option such as -h.
    sub.add_parser("bench", help="benchmarks against the peers (allreduce, train, zero); see hvdkit bench -h",
                   add_help=False)
    checkpoint = sub.add_parser("checkpoint", help="checkpoint tools: merge a sharded checkpoint into one file")
    merge = checkpoint.add_subparsers(dest="action", required=True).add_parser(
        "merge", help="write a sharded checkpoint (--shard-optimizer) as an ordinary single-file one")
    merge.add_argument("source", help="the --checkpoint-dir that holds the sharded checkpoint")
    merge.add_argument("dest", help="a checkpoint directory to write the merged checkpoint into")
    merge.add_argument("--number", type=int, default=None, help="which checkpoint (default: the newest)")
    audit = sub.add_parser("audit", help="prove exactly-once training from --audit-dir records")
    audit.add_argument("directory")
    audit.add_argument("--samples", type=int, required=True, help="training samples per epoch")
    audit.add_argument("--epochs", type=int, required=True)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:   # bench parses its own arguments, -h included
            from .bench.run import main as bench_main
            return bench_main(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "doctor":
            if args.hosts is not None:
                return _doctor_hosts(args)
            if args.ssh_port or args.ssh_identity_file or args.network_interface:
                raise HvdkitError("--ssh-port, --ssh-identity-file and --network-interface apply to "
                                  "doctor --hosts; add --hosts h1,h2 or drop them")
            from .doctor import run_doctor
            return run_doctor(as_json=args.json)
        if args.command == "checkpoint":
            from .merge import merge_checkpoint
            print(merge_checkpoint(args.source, args.dest, args.number))
            return 0
        if args.command == "audit":
            from .audit import main as audit_main
            return audit_main([args.directory, "--samples", str(args.samples), "--epochs", str(args.epochs)])
        return _launch(args)
    except HvdkitError as e:
        print(f"hvdkit: error: {e}", file=sys.stderr)
        return 2


def _doctor_hosts(args: argparse.Namespace) -> int:
    hosts = [h.strip().partition(":")[0] for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        raise HvdkitError("--hosts lists no host; pass e.g. --hosts node1,node2")
    if args.json:
        raise HvdkitError("doctor --hosts prints lines, not JSON; drop --json")
    from .doctor.hosts import run_hosts_doctor
    return run_hosts_doctor(hosts, iface=args.network_interface, port=args.ssh_port,
                            key=args.ssh_identity_file)


def _launch(args: argparse.Namespace) -> int:
    """Check, build, then run (or ``--print``) the launch command; the exit codes are hvdkit.supervise's."""
    args.script, passed = _split_passthrough(args.script)
    if not args.script:
        raise HvdkitError("launch needs a script to run, e.g. hvdkit launch -np 2 examples/torch_digits.py")
    stray = [f"--{name.replace('_', '-')}" for name in ELASTIC_FLAGS if getattr(args, name) is not None]
    if stray and not args.hosts_file:
        verb = "applies" if len(stray) == 1 else "apply"
        raise HvdkitError(f"{', '.join(stray)} {verb} only to elastic launches; add --hosts-file FILE or drop them")
    hosts, where_note = _static_hosts(args)
    if args.np is None:
        args.np = total_slots(hosts) if hosts else 2
    _check_remote_options(args)
    min_np = 1 if args.min_np is None else args.min_np
    notes = preflight(args.script, np=args.np, launcher=args.launcher, hosts_file=args.hosts_file, min_np=min_np,
                      max_np=args.max_np, check_files=not args.print,
                      controller=args.controller)
    if args.reset_limit is not None and args.reset_limit < 0:
        raise HvdkitError(f"--reset-limit must be >= 0 (got {args.reset_limit}); pass e.g. --reset-limit 3")
    spec = None
    if args.hosts_file:
        spec = Elastic(discovery_command(args.hosts_file), min_np=min_np, max_np=args.max_np,
                       timeout=600 if args.elastic_timeout is None else args.elastic_timeout,
                       reset_limit=args.reset_limit, network_interface=args.network_interface)
        if "--blacklist-cooldown-range" in passed:   # the user's range replaces the default one
            spec.cooldown = None
    cmd = launch_command(args.script, np=args.np, launcher=args.launcher, hosts=hosts, elastic=spec,
                         network_interface=None if spec else args.network_interface, ssh_port=args.ssh_port,
                         ssh_identity_file=args.ssh_identity_file, forward=args.forward,
                         controller=args.controller, extra=passed)
    if args.print:
        print(shlex.join(cmd), flush=True)
        return 0
    log = _writable_log(args.log)
    for note in ([where_note] if where_note else []) + notes:
        print(note, file=sys.stderr)
    print(shlex.join(cmd), file=sys.stderr, flush=True)
    from .supervise import supervise
    return supervise(cmd, log_path=log, verbose=args.verbose, keep_log=args.log is not None)


def _split_passthrough(script):
    """``-- FLAGS -- script.py ARGS`` -> (``script.py ARGS``, ``FLAGS``): launcher flags hvdkit passes on as they are
    (before the Python command); without a leading ``--`` everything is the script.

    >>> _split_passthrough(["--", "--verbose", "--", "t.py", "--", "x"])
    (['t.py', '--', 'x'], ['--verbose'])
    """
    if script[:1] != ["--"]:
        return list(script), []
    try:
        end = script.index("--", 1)
    except ValueError:
        raise HvdkitError("launcher flags after -- end with another --, then the script: "
                          "hvdkit launch -np 2 -- --verbose -- train.py") from None
    if any(not arg.startswith("-") for arg in script[1:2]):
        raise HvdkitError(f"{script[1]!r} after -- is not a launcher flag; pass flags between two --, "
                          "e.g. -- --verbose -- train.py")
    return list(script[end + 1:]), list(script[1:end])


def _static_hosts(args: argparse.Namespace):
    """The ``-H`` value and a note: from -H or --hostfile (at most one, and neither with elastic --hosts-file),
    else from a scheduler's environment (SLURM_JOB_NODELIST, OMPI_MCA_orte_default_hostfile), else None."""
    given = [flag for flag, value in (("-H", args.hosts), ("--hostfile", args.hostfile),
                                      ("--hosts-file", args.hosts_file)) if value]
    if len(given) > 1:
        raise HvdkitError(f"{' and '.join(given)} both say where to run; keep one "
                          "(--hosts-file is for elastic jobs, --hostfile and -H for static ones)")
    if given and not args.hostfile:
        slots = total_slots(args.hosts) if args.hosts else None   # also refuses a bad item (-H a:x)
        if slots is not None and args.np is not None and args.np > slots:
            raise HvdkitError(f"-np {args.np} is more than the {slots} slot(s) in -H {args.hosts}; "
                              "lower -np or add slots (-H host:slots)")
        return args.hosts, None
    if args.hostfile:
        hosts, source = hostfile.read(args.hostfile), args.hostfile
    else:   # nothing on the command line: hosts a scheduler gave (SLURM, Kubernetes' MPI Operator), if any
        found = hostfile.scheduler_hosts(os.environ)
        if found is None:
            return None, None
        hosts, source = found
    slots = sum(n for _, n in hosts)
    if args.np is not None and args.np > slots:
        raise HvdkitError(f"-np {args.np} is more than the {slots} slot(s) in {source}; "
                          "lower -np or add slots (--hostfile, -H)")
    note = None if args.hostfile else f"hvdkit: note: hosts from {source}: {hostfile.hosts_arg(hosts)}"
    return hostfile.hosts_arg(hosts), note


def _check_remote_options(args: argparse.Namespace) -> None:
    if args.ssh_port is not None and not 0 < args.ssh_port < 65536:
        raise HvdkitError(f"--ssh-port {args.ssh_port} is not a port; pass e.g. --ssh-port 22")
    if args.ssh_identity_file and any(c.isspace() for c in args.ssh_identity_file):
        raise HvdkitError(f"--ssh-identity-file {args.ssh_identity_file!r} has whitespace in its path, which mpirun's "
                          "ssh arguments cannot carry; move or link the key to a path without spaces")
    if args.ssh_identity_file and not args.print and not os.path.isfile(args.ssh_identity_file):
        raise HvdkitError(f"--ssh-identity-file {args.ssh_identity_file} not found; pass the private key's path")
    horovodrun_controller(args.launcher, args.controller, elastic=bool(args.hosts_file))


def _writable_log(path):
    """Check a --log path before the job starts (a job must not fail at the end for want of its log)."""
    if path is None:
        return None
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise HvdkitError(f"cannot write log file {path} ({e.strerror}); pass --log with a writable path") from None
    return path


if __name__ == "__main__":
    sys.exit(main())
