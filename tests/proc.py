"""Running launchers from tests: a timeout, the whole process group killed, output kept for asserts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from typing import Dict, Optional, Sequence

from hvdkit.launch import launch_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(REPO, "tests", "workers")


def marked_processes(marker: str):
    """(pid, environ) of live processes started with HVDKIT_TEST_JOB=marker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                pairs = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
        except OSError:
            continue
        env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
        if env.get("HVDKIT_TEST_JOB") == marker:
            found.append((int(entry), env))
    return found


def kill_marked(marker: str) -> None:
    """SIGKILL every process of one test job, also those horovodrun moved to sessions of their own."""
    for pid, _ in marked_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def run(cmd: Sequence[str], timeout: float = 180, env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole group and fail with its output."""
    marker = f"job-{os.getpid()}-{uuid.uuid4().hex}"
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", HVDKIT_TEST_JOB=marker)
    full_env.update(env or {})
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd or REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(marker)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s (hang?): {' '.join(cmd)}\n--- stdout\n{out[-4000:]}"
                             f"\n--- stderr\n{err[-4000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(marker)  # workers left behind by a failed job
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def launch(script: str, args: Sequence[str] = (), np: int = 2, launcher: str = "horovodrun",
           timeout: float = 180, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a script under a launcher exactly as a user would (through hvdkit.launch_command)."""
    path = script if os.path.isabs(script) else os.path.join(REPO, script)
    cmd = launch_command([path, *args], np=np, launcher=launcher, python=sys.executable, env=env)
    return run(cmd, timeout=timeout, env=env)


def explain(result: subprocess.CompletedProcess) -> str:
    return (f"exit {result.returncode}: {' '.join(result.args)}\n--- stdout\n{result.stdout[-6000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}")
