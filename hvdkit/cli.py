"""``hvdkit`` command line: ``doctor`` (preflight), ``launch`` (run a script on N workers), ``audit``, ``bench``.

Example::

    hvdkit doctor --json
    hvdkit launch -np 2 examples/torch_digits.py --epochs 3
    hvdkit launch --launcher mpirun -np 2 --print examples/torch_digits.py
    hvdkit launch -np 2 --hosts-file hosts.txt --max-np 4 examples/torch_digits.py     # elastic
    hvdkit audit results/audit --samples 1437 --epochs 3
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .errors import HvdkitError
from .launch import LAUNCHERS, Elastic, discovery_command, launch_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvdkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check that this machine can run Horovod jobs")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    launch = sub.add_parser("launch", help="run a Python script on N workers")
    launch.add_argument("--launcher", choices=LAUNCHERS, default="horovodrun")
    launch.add_argument("-np", "--num-proc", dest="np", type=int, default=2)
    launch.add_argument("-H", "--hosts", default=None, help="host1:slots,host2:slots (default localhost:NP)")
    launch.add_argument("--print", action="store_true", help="print the command instead of running it")
    elastic = launch.add_argument_group("elastic (horovodrun only)")
    elastic.add_argument("--hosts-file",
                         help="elastic: hosts come from this file (python -m hvdkit.discover_hosts reads it)")
    elastic.add_argument("--min-np", type=int, default=1)
    elastic.add_argument("--max-np", type=int, default=None)
    elastic.add_argument("--elastic-timeout", type=int, default=600)
    elastic.add_argument("--network-interface", default=None, help='e.g. eth0; "lo" to start on one machine')
    launch.add_argument("script", nargs=argparse.REMAINDER, help="script.py and its arguments")
    bench = sub.add_parser("bench", help="benchmarks against the peers (allreduce, train); see hvdkit bench -h",
                           add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    audit = sub.add_parser("audit", help="prove exactly-once training from --audit-dir records")
    audit.add_argument("directory")
    audit.add_argument("--samples", type=int, required=True, help="training samples per epoch")
    audit.add_argument("--epochs", type=int, required=True)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "doctor":
            from .doctor import run_doctor
            return run_doctor(as_json=args.json)
        if args.command == "bench":
            from .bench.run import main as bench_main
            return bench_main(args.rest)
        if args.command == "audit":
            from .audit import main as audit_main
            return audit_main([args.directory, "--samples", str(args.samples), "--epochs", str(args.epochs)])
        if not args.script:
            raise HvdkitError("launch needs a script to run, e.g. hvdkit launch -np 2 examples/torch_digits.py")
        spec = None
        if args.hosts_file:
            spec = Elastic(discovery_command(args.hosts_file), min_np=args.min_np, max_np=args.max_np,
                           timeout=args.elastic_timeout, network_interface=args.network_interface)
        cmd = launch_command(args.script, np=args.np, launcher=args.launcher, hosts=args.hosts, elastic=spec)
        print(shlex.join(cmd), file=sys.stdout if args.print else sys.stderr, flush=True)
        if args.print:
            return 0
        os.execvp(cmd[0], cmd)
    except HvdkitError as e:
        print(f"hvdkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
