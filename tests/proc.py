"""Running launchers from tests: a timeout, the whole process group killed, output kept for asserts; finding
the processes a test left behind (conftest.py fails such a test)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Optional, Sequence, Set, Tuple

from hvdkit.launch import launch_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(REPO, "tests", "workers")


OWNER_VAR = "HVDKIT_TEST_OWNER"   # set per test by conftest.py; every process a test starts inherits it
# lifetime helpers a library may fork from pytest itself; never a test's leftover
PYTEST_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "orted")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _environ(pid: int) -> Dict[str, str]:
    """A process's environment as it was exec'd (empty for zombies and processes we may not read)."""
    pairs = [kv.split(b"=", 1) for kv in _read(f"/proc/{pid}/environ").split(b"\0") if b"=" in kv]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def _process_table() -> Dict[int, Tuple[str, int]]:
    """pid -> (state letter, parent pid) of every process now."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:  # "pid (comm) S ppid ...": comm may hold spaces and parentheses
                fields = stat[stat.rindex(b")") + 2:].split()
                table[int(entry)] = (fields[0].decode(), int(fields[1]))
    return table


def marked_processes(marker: str):
    """(pid, environ) of live processes started with HVDKIT_TEST_JOB=marker."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            env = _environ(int(entry))
            if env.get("HVDKIT_TEST_JOB") == marker:
                found.append((int(entry), env))
    return found


def kill_marked(marker: str, wait: float = 5.0) -> None:
    """SIGKILL every process of one test job, also those horovodrun moved to sessions of their own, and
    again any started meanwhile, until none is left (at most ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        found = marked_processes(marker)
        for pid, _ in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not found or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def descendants(root: Optional[int] = None) -> Set[int]:
    """Pids of the live (not zombie) descendants of ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    table = _process_table()
    children: Dict[int, List[int]] = {}
    for pid, (_, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if table[pid][0] not in "ZX"}


def owned_processes(owner: str, baseline: Set[int] = frozenset()) -> Dict[int, str]:
    """pid -> command line of the live processes of one test: those whose environment carries
    ``HVDKIT_TEST_OWNER=owner`` (even in sessions of their own, reparented to init) and this process's
    descendants not in ``baseline`` (forked children do not show a changed environment). This process,
    zombies and pytest's own lifetime helpers (PYTEST_HELPERS) are left out."""
    me, table = os.getpid(), _process_table()
    mine = descendants(me)
    found = {}
    for pid, (state, ppid) in table.items():
        if pid == me or state in "ZX" or pid in baseline:
            continue
        if pid in mine or _environ(pid).get(OWNER_VAR) == owner:
            cmdline = _cmdline(pid)
            if ppid == me and any(helper in cmdline for helper in PYTEST_HELPERS):
                continue
            found[pid] = cmdline or f"<pid {pid}>"
    return found


def reap_leaks(owner: str, baseline: Set[int] = frozenset(), grace: float = 5.0) -> Dict[int, str]:
    """The processes of test ``owner`` still alive ``grace`` seconds on (those exiting on their own by then
    are not leaks), SIGKILLed and waited for (up to 5 s more); pid -> command line."""
    deadline = time.monotonic() + grace
    leaked = owned_processes(owner, baseline)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = owned_processes(owner, baseline)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 5.0   # dead = gone or a zombie (our own children stay for Popen to reap)
    while set(leaked) & set(owned_processes(owner, baseline)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return leaked


def file_contents(path: str) -> Optional[Dict[str, bytes]]:
    """Path -> bytes of ``path`` itself (a file) or of every file under it (a directory); None when absent. Two
    readings compare equal only if nothing was written, added or removed there."""
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return {path: f.read()}
    found = {}
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            with open(full, "rb") as f:
                found[full] = f.read()
    return found


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
    """Run a script under a launcher exactly as a user would (through hvdkit.launch_command). ``launcher``:
    ``horovodrun`` (a static job: its MPI controller, the default), ``horovodrun-gloo`` (``--controller gloo``) or
    ``mpirun``."""
    path = script if os.path.isabs(script) else os.path.join(REPO, script)
    controller = "gloo" if launcher == "horovodrun-gloo" else None
    cmd = launch_command([path, *args], np=np, launcher=launcher.replace("-gloo", ""), python=sys.executable,
                         env=env, controller=controller)
    return run(cmd, timeout=timeout, env=env)


def explain(result: subprocess.CompletedProcess) -> str:
    return (f"exit {result.returncode}: {' '.join(result.args)}\n--- stdout\n{result.stdout[-6000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}")
