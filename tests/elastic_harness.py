"""Driving an elastic horovodrun job from a test: hosts file edits, kills, audit reads, always a timeout."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from hvdkit.launch import Elastic, discovery_command, launch_command
from proc import REPO, kill_marked, marked_processes

# what a test calls a framework -> the example and its flags; "tfdata": Keras fed by tf.data (TFStream)
EXAMPLES = {"torch": ["examples/torch_digits.py"], "tensorflow": ["examples/keras_digits.py"],
            "tfdata": ["examples/keras_digits.py", "--input", "tfdata"],
            "tfdata-loop": ["examples/keras_digits.py", "--input", "tfdata", "--mode", "loop"]}


class ElasticJob:
    """One elastic job of an example script, started in its own process group."""

    def __init__(self, tmp, framework: str, hosts: List[str], np: int, extra=(), max_np: int = 2,
                 timeout: int = 30, reset_limit: Optional[int] = None, tag: str = "run"):
        self.tmp, self.framework = tmp, framework
        self.hosts_file = os.path.join(tmp, "hosts.txt")
        self.audit_dir = os.path.join(tmp, "audit")
        self.ckpt = os.path.join(tmp, "ckpt")
        self.metrics = os.path.join(tmp, f"metrics-{tag}.json")
        self.log_path = os.path.join(tmp, f"{tag}.log")
        self.set_hosts(hosts)
        script, *flags = EXAMPLES[framework]
        args = [os.path.join(REPO, script), *flags, "--audit-dir", self.audit_dir, "--metrics-json", self.metrics,
                "--checkpoint-dir", self.ckpt, "--no-progress", *extra]
        elastic = Elastic(discovery_command(self.hosts_file), min_np=1, max_np=max_np, timeout=timeout,
                          reset_limit=reset_limit, cooldown=None, network_interface="lo")
        self.cmd = launch_command(args, np=np, elastic=elastic, python=sys.executable)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HVDKIT_TEST_JOB=tmp)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)

    def set_hosts(self, hosts: List[str]) -> None:
        tmp = self.hosts_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(h + "\n" for h in hosts))
        os.replace(tmp, self.hosts_file)  # the discovery script never sees half a file

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def records(self) -> List[dict]:
        lines = []
        for path in glob.glob(os.path.join(self.audit_dir, "audit-*.jsonl")):
            with open(path) as f:
                lines += [json.loads(l) for l in f if l.strip().endswith("}")]
        return lines

    def resets(self) -> List[dict]:
        """Rank 0's reset lines so far: workers before and after, and the commit's epoch and sample."""
        found = re.findall(r"workers (\d+) -> (\d+) \(.*?the commit at epoch (\d+), sample (\d+)", self.output())
        return [{"from": int(a), "to": int(b), "epoch": int(e), "sample": int(p)} for a, b, e, p in found]

    def wait_for(self, predicate, what: str, timeout: float = 120) -> None:
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
        manifests = sorted(glob.glob(os.path.join(self.ckpt, "ckpt-*.json")))
        for path in reversed(manifests):
            try:
                with open(path) as f:
                    return json.load(f)["world_size"]
            except (OSError, ValueError):
                continue  # replaced or pruned while we looked
        return 0

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
        """SIGKILL the launcher's group and every worker of this job (they live in their own sessions)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_marked(self.tmp)
        self.proc.wait(timeout=30)
        self.log.close()
