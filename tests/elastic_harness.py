"""Driving an elastic horovodrun job from a test: hosts file edits, kills, audit reads, always a timeout.

Workers run the example through tests/workers/gated.py: with ``gate_step=N`` every worker stops after
step N (before that step's commit) until the test calls :meth:`ElasticJob.release`, so a kill or a
hosts-file edit happens at a known step, not wherever polling found the job. ``gate_step=[N, M, ...]`` stops
the job at each of those steps in turn (``wait_gate(..., step=N)``, ``release(step=N)``): several events in one
job. Use the ``elastic_job`` fixture (conftest.py) to start jobs: it kills them when the test ends, passed or
failed (tests/test_elastic.py drives module-scoped jobs itself, killing them in ``finally``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Union

from hvdkit.launch import Elastic, discovery_command, launch_command
from proc import REPO, WORKERS, kill_marked, marked_processes

GATED = os.path.join(WORKERS, "gated.py")

# what a test calls a framework -> the example and its flags; "tfdata": Keras fed by tf.data (TFStream)
EXAMPLES = {"torch": ["examples/torch_digits.py"], "tensorflow": ["examples/keras_digits.py"],
            "tfdata": ["examples/keras_digits.py", "--input", "tfdata"],
            "tfdata-loop": ["examples/keras_digits.py", "--input", "tfdata", "--mode", "loop"]}


class ElasticJob:
    """One elastic job of an example script, started in its own process group."""

    def __init__(self, tmp, framework: str, hosts: List[str], np: int, extra=(), max_np: int = 2,
                 timeout: int = 30, reset_limit: Optional[int] = None, tag: str = "run",
                 gate_step: Union[None, int, List[int]] = None, gate_at: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, cooldown: Optional[tuple] = None):
        self.tmp, self.framework = tmp, framework
        self.gate_dir = os.path.join(tmp, f"gate-{tag}")
        self.gate_steps = [gate_step] if isinstance(gate_step, int) else list(gate_step or [])
        self.hosts_file = os.path.join(tmp, "hosts.txt")
        self.audit_dir = os.path.join(tmp, "audit")
        self.ckpt = os.path.join(tmp, "ckpt")
        self.metrics = os.path.join(tmp, f"metrics-{tag}.json")
        self.log_path = os.path.join(tmp, f"{tag}.log")
        self.set_hosts(hosts)
        script, *flags = EXAMPLES[framework]
        args = [GATED, os.path.join(REPO, script), *flags, "--audit-dir", self.audit_dir,
                "--metrics-json", self.metrics, "--checkpoint-dir", self.ckpt, "--no-progress", *extra]
        elastic = Elastic(discovery_command(self.hosts_file), min_np=1, max_np=max_np, timeout=timeout,
                          reset_limit=reset_limit, cooldown=cooldown, network_interface="lo")
        # a Gloo timeout of the job's own replaces launch_command's elastic default (which yields to one in os.environ)
        gloo = {k: v for k, v in (env or {}).items() if k == "HOROVOD_GLOO_TIMEOUT_SECONDS"}
        self.cmd = launch_command(args, np=np, elastic=elastic, python=sys.executable, env=gloo)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HVDKIT_TEST_JOB=tmp, **(env or {}))
        if gate_step is not None or gate_at is not None:  # gate_at: "end" or "exit" (see workers/gated.py)
            os.makedirs(self.gate_dir, exist_ok=True)
            env.update(HVDKIT_GATE_DIR=self.gate_dir, HVDKIT_GATE_STEP=",".join(map(str, self.gate_steps or [0])),
                       HVDKIT_GATE_AT=gate_at or "step")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)

    def set_hosts(self, hosts: List[str]) -> None:
        tmp = self.hosts_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(h + "\n" for h in hosts))
        os.replace(tmp, self.hosts_file)  # the discovery script never sees half a file

    def output(self) -> str:
        with open(self.log_path) as f:  # written by the job itself, never through self.log
            return f.read()

    def records(self) -> List[dict]:
        lines = []
        for path in glob.glob(os.path.join(self.audit_dir, "audit-*.jsonl")):
            with open(path) as f:
                lines += [json.loads(l) for l in f if l.strip().endswith("}")]
        return lines

    def resets(self) -> List[dict]:
        """Rank 0's reset lines so far: workers before and after, whether it rolled back, and the commit's
        epoch (1-based), sample and step."""
        found = re.findall(r"workers (\d+) -> (\d+) \(.*?(rolled back to|continuing from) the commit at epoch (\d+), "
                           r"sample (\d+), step (\d+)", self.output())
        return [{"from": int(a), "to": int(b), "rolled_back": how == "rolled back to", "epoch": int(e),
                 "sample": int(p), "step": int(st)} for a, b, how, e, p, st in found]

    # ---- the gate (gate_step) --------------------------------------------------------------------
    def _step_dir(self, step: Optional[int]) -> str:
        """The gate of ``step``'s directory (gated.py): the gate dir itself when the job has one gate."""
        steps = getattr(self, "gate_steps", [])   # a subclass may set up its own single gate
        if len(steps) <= 1:
            return self.gate_dir
        assert step in steps, f"step {step} is not one of this job's gates {steps}"
        return os.path.join(self.gate_dir, f"step{step}")

    def _gate_files(self, prefix: str, directory: Optional[str] = None) -> List[str]:
        directory = directory or self.gate_dir
        if not os.path.isdir(directory):
            return []
        return sorted(n for n in os.listdir(directory) if n.startswith(prefix) and not n.endswith(".tmp"))

    def wait_gate(self, hosts: List[str], timeout: float = 180, step: Optional[int] = None) -> Dict[str, int]:
        """Wait until a worker on each of ``hosts`` (HOROVOD_HOSTNAME) stopped at the gate (of ``step``, when the
        job has several); host -> its pid."""
        directory = self._step_dir(step)

        def reached():
            pairs = (name[len("reached-"):].rsplit("-", 1) for name in self._gate_files("reached-", directory))
            return {host: int(pid) for host, pid in pairs}
        where = "the gate" if step is None else f"the gate of step {step}"
        self.wait_for(lambda: set(hosts) <= set(reached()), f"workers on {hosts} at {where}", timeout)
        return {host: pid for host, pid in reached().items() if host in hosts}

    def change_hosts(self, hosts: List[str], timeout: float = 60) -> None:
        """Edit the hosts file while the workers wait at the gate, and wait until horovodrun's driver has
        told rank 0 (it runs discovery every second): the resize then happens at the next commit."""
        before = set(self._gate_files("hosts-updated-"))
        self.set_hosts(hosts)
        self.wait_for(lambda: set(self._gate_files("hosts-updated-")) - before,
                      f"horovodrun to notify the workers of hosts {hosts}", timeout)

    def release(self, step: Optional[int] = None) -> None:
        with open(os.path.join(self._step_dir(step), "release"), "w"):
            pass

    def wait_for(self, predicate, what: str, timeout: float = 120) -> None:
        """Poll ``predicate`` every 0.1 s; fail (killing the job) if the job ends or ``timeout`` passes first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (exit {self.proc.returncode}) before {what}\n{self.output()[-5000:]}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}\n{self.output()[-5000:]}")

    def max_step(self, world: Optional[int] = None) -> int:
        steps = [r["step"] for r in self.records() if r["kind"] == "step" and (world is None or r["world"] == world)]
        return max(steps, default=0)

    def newest_commit_world(self) -> int:
        """World size of the newest durable commit (every commit is durable in these jobs), 0 if none."""
        manifests = self.manifests()
        return manifests[-1]["world_size"] if manifests else 0

    def worker_pids(self) -> Dict[str, int]:
        """HOROVOD_HOSTNAME -> pid of this job's live workers (horovodrun starts them in their own sessions)."""
        return {env.get("HOROVOD_HOSTNAME", "?"): pid for pid, env in marked_processes(self.tmp)
                if "HOROVOD_HOSTNAME" in env and "HOROVOD_RANK" in env}

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"elastic job hung (> {timeout}s)\n{self.output()[-5000:]}") from None

    def kill(self) -> None:
        """SIGKILL the launcher's group and every worker of this job (they live in their own sessions);
        safe to call again, and on a job that has ended."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_marked(self.tmp)
        self.proc.wait(timeout=30)
        self.log.close()

    def manifests(self) -> List[dict]:
        """The durable checkpoints that have a readable manifest, oldest first (an orphan .bin, killed
        before its manifest was written, is no checkpoint)."""
        found = []
        for path in sorted(glob.glob(os.path.join(self.ckpt, "ckpt-*.json"))):
            try:
                with open(path) as f:
                    found.append(dict(json.load(f), bin_path=path[:-len(".json")] + ".bin"))
            except (OSError, ValueError):
                continue
        return found
