"""Audit mode: each rank records which sample ids it trained on, and a checker proves exactly-once.

Records are JSON lines in ``DIR/audit-<host>-<pid>.jsonl``, written only for committed steps (a
step rolled back by elastic recovery is never recorded). Every process first writes a ``start``
line with the global step it resumed at; records of earlier processes beyond that step were
undone by the restart (a whole job restarted from a durable commit) and the checker drops them.

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


class AuditLog:
    """Buffers (epoch, step, ids) per step; ``commit`` appends them, ``discard`` forgets them."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"audit-{socket.gethostname()}-{os.getpid()}.jsonl")
        self.pending: List[dict] = []
        self.started = False

    def _write(self, lines: List[dict]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))

    def start(self, global_step: int, rank: int, world_size: int) -> None:
        """Called once this process knows where it resumed (after the first state sync)."""
        if not self.started:
            self._write([{"kind": "start", "time": time.time(), "step": global_step, "rank": rank,
                          "world": world_size}])
            self.started = True

    def record(self, epoch: int, global_step: int, rank: int, world_size: int, ids) -> None:
        self.pending.append({"kind": "step", "epoch": epoch, "step": global_step, "rank": rank,
                             "world": world_size, "ids": [int(i) for i in ids]})

    def commit(self) -> None:
        if self.pending:
            now = time.time()
            self._write([dict(line, time=now) for line in self.pending])
            self.pending = []

    def discard(self) -> None:
        self.pending = []


def load(directory: str) -> List[dict]:
    lines = []
    for path in sorted(glob.glob(os.path.join(directory, "audit-*.jsonl"))):
        with open(path) as f:
            for raw in f:
                if raw.strip():
                    lines.append(json.loads(raw))
    return lines


def check(directory: str, samples: int, epochs: int) -> Dict[str, object]:
    """Verify every sample id of every epoch was trained exactly once; returns a report dict.

    ``report["ok"]`` is True when so; ``report["problems"]`` lists one line per epoch that fails.
    """
    lines = load(directory)
    starts = sorted((l for l in lines if l["kind"] == "start"), key=lambda l: l["time"])
    steps = [l for l in lines if l["kind"] == "step"]
    # A process that started later at step g undoes whatever earlier processes recorded beyond g.
    kept = [s for s in steps if not any(st["time"] > s["time"] and s["step"] > st["step"] for st in starts)]
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
            "processes": len(starts), "world_sizes": {e: sorted(w) for e, w in sorted(worlds.items())}}


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="hvdkit audit", description="prove exactly-once training from audit logs")
    parser.add_argument("directory")
    parser.add_argument("--samples", type=int, required=True, help="training samples per epoch")
    parser.add_argument("--epochs", type=int, required=True)
    args = parser.parse_args(argv)
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
