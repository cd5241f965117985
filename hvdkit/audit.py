"""Audit mode: each rank records which sample ids it trained on, and a checker proves exactly-once.

Records are JSON lines in ``DIR/audit-<host>-<pid>.jsonl``. A rank writes a step's ids just before it
trains the step. When training rolls back — elastic recovery from a lost worker, or a whole job
restarted from a durable commit — the process writes a marker with the step it resumed at, and the
checker drops every record of a later step written before that marker: that work was undone or
never finished. (Writing after the step, or at commit time, loses the ids of a rank killed between a
step's allreduce and the write, although the survivors' state includes its gradients: seen in CI.)

Example::

    hvdkit audit results/audit --samples 1437 --epochs 3     # exit 0: every sample once per epoch
"""
from __future__ import annotations

import glob
import json
import os
import socket
import time
from collections import defaultdict
from typing import Dict, List, Optional

from .errors import HvdkitError


class AuditLog:
    """Appends one line per step as it starts, and a marker line where training resumed or rolled back."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"audit-{socket.gethostname()}-{os.getpid()}.jsonl")
        self.started = False

    def _write(self, line: dict) -> None:
        with open(self.path, "a") as f:  # one write per line; survives the process being killed
            f.write(json.dumps(dict(line, time=time.time())) + "\n")

    def start(self, global_step: int, rank: int, world_size: int) -> None:
        """Once per process, when it knows the step it starts from (after the first state sync)."""
        if not self.started:
            self._write({"kind": "start", "step": global_step, "rank": rank, "world": world_size})
            self.started = True

    def rolled_back(self, global_step: int) -> None:
        """Training went back to the commit at ``global_step``: later steps recorded so far were undone."""
        self._write({"kind": "rollback", "step": global_step})

    def record(self, epoch: int, global_step: int, rank: int, world_size: int, ids) -> None:
        self._write({"kind": "step", "epoch": epoch, "step": global_step, "rank": rank, "world": world_size,
                     "ids": [int(i) for i in ids]})


def load(directory: str) -> List[dict]:
    lines = []
    for path in sorted(glob.glob(os.path.join(directory, "audit-*.jsonl"))):
        with open(path) as f:
            for raw in f:
                if raw.strip():
                    lines.append(dict(json.loads(raw), file=path))
    return lines


def check(directory: str, samples: int, epochs: int) -> Dict[str, object]:
    """Verify every sample id of every epoch was trained exactly once; returns a report dict.

    ``report["ok"]`` is True when so; ``report["problems"]`` lists one line per epoch that fails.
    """
    lines = load(directory)
    starts = [l for l in lines if l["kind"] == "start"]
    rollbacks = [l for l in lines if l["kind"] == "rollback"]
    steps = [l for l in lines if l["kind"] == "step"]
    last_write = {}
    for l in lines:
        last_write[l["file"]] = max(last_write.get(l["file"], 0.0), l["time"])

    def undone(s):
        # A rollback to step g undoes every later step recorded before it. A process starting at step g
        # (a restarted job) undoes later steps of processes that were gone by then — not of live peers,
        # which record their next step before a slower peer's start line.
        return (any(r["time"] > s["time"] and s["step"] > r["step"] for r in rollbacks) or
                any(st["time"] > last_write[s["file"]] and s["step"] > st["step"] for st in starts))
    kept = [s for s in steps if not undone(s)]
    per_epoch: Dict[int, List[int]] = defaultdict(list)
    worlds = defaultdict(set)
    for s in kept:
        per_epoch[s["epoch"]].extend(s["ids"])
        worlds[s["epoch"]].add(s["world"])
    problems = []
    for epoch in range(epochs):
        ids = per_epoch.get(epoch, [])
        counts = defaultdict(int)
        for i in ids:
            counts[i] += 1
        missing = [i for i in range(samples) if counts[i] == 0]
        twice = sorted(i for i, c in counts.items() if c > 1)
        outside = sorted(i for i in counts if not 0 <= i < samples)
        if missing or twice or outside:
            problems.append(f"epoch {epoch}: {len(missing)} samples never trained (e.g. {missing[:5]}), "
                            f"{len(twice)} trained more than once (e.g. {twice[:5]}), {len(outside)} unknown ids")
    return {"ok": not problems, "problems": problems, "records": len(steps), "dropped": len(steps) - len(kept),
            "processes": len(starts), "rollbacks": len(rollbacks), "world_sizes": {e: sorted(w) for e, w in sorted(worlds.items())}}


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="hvdkit audit", description="prove exactly-once training from audit logs")
    parser.add_argument("directory")
    parser.add_argument("--samples", type=int, required=True, help="training samples per epoch")
    parser.add_argument("--epochs", type=int, required=True)
    args = parser.parse_args(argv)
    if not glob.glob(os.path.join(args.directory, "audit-*.jsonl")):
        raise HvdkitError(f"no audit records (audit-*.jsonl) in {args.directory}; pass the --audit-dir the run "
                          "wrote to")
    report = check(args.directory, args.samples, args.epochs)
    for line in report["problems"]:
        print(f"problem: {line}")
    print(f"audit: {'OK' if report['ok'] else 'FAILED'} ({report['records']} step records, "
          f"{report['dropped']} undone by restarts, {report['processes']} processes, world sizes per epoch "
          f"{report['world_sizes']})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    import sys
    sys.exit(main())
