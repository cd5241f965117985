"""The test harness itself: the leaked-process check of conftest.py and the step gate of tests/workers/gated.py."""
import os
import shutil
import signal
import subprocess
import sys
import time


from proc import OWNER_VAR, REPO, WORKERS, descendants, reap_leaks

pytest_plugins = ["pytester"]
TESTS = os.path.dirname(os.path.abspath(__file__))


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_leak_check_finds_and_kills_children_and_orphans_but_not_processes_exiting_in_time():
    owner, baseline = os.environ[OWNER_VAR], descendants()   # set by conftest's fixture for this test
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    # an orphan in a session of its own, reparented away from pytest: found by its environment only
    orphan = int(subprocess.run(["setsid", "sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True,
                                text=True, timeout=30, check=True).stdout)
    quick = subprocess.Popen(["sleep", "0.3"])
    try:
        leaked = reap_leaks(owner, baseline, grace=2.0)
        assert set(leaked) == {child.pid, orphan}, leaked
        assert "sleep 60" in leaked[child.pid]
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert dead(orphan)
        assert quick.wait(timeout=10) == 0
        assert reap_leaks(owner, baseline, grace=0) == {}
    finally:
        for pid in (child.pid, orphan):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_test_leaving_a_process_behind_fails_and_the_process_is_killed(pytester):
    for name in ("conftest.py", "proc.py"):
        shutil.copy(os.path.join(TESTS, name), pytester.path / name)
    pytester.makepyfile(test_inner="""
        import subprocess

        def test_leaks():
            child = subprocess.Popen(["sleep", "60"], start_new_session=True)
            with open("leaked.pid", "w") as f:
                f.write(str(child.pid))

        def test_clean():
            subprocess.run(["sleep", "0.1"], check=True, timeout=10)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*", "*left 1 process(es) running*",
                                 "*pid * sleep 60*"])
    assert dead(int((pytester.path / "leaked.pid").read_text()))
    assert OWNER_VAR in os.environ   # the outer test's own marker is untouched


def test_gate_holds_the_worker_after_its_step_until_released(tmp_path):
    gate = tmp_path / "gate"
    metrics = tmp_path / "metrics.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HVDKIT_GATE_DIR=str(gate), HVDKIT_GATE_STEP="3",
               HVDKIT_TEST_JOB=str(tmp_path))
    cmd = [sys.executable, os.path.join(WORKERS, "gated.py"), os.path.join(REPO, "examples", "torch_digits.py"),
           "--epochs", "2", "--batch-size", "256", "--limit-train", "1024", "--no-progress",
           "--metrics-json", str(metrics)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(gate.glob("reached-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        reached = [p.name for p in gate.glob("reached-*")]
        assert reached == [f"reached-localhost-{proc.pid}"], (reached, proc.poll())
        time.sleep(1.0)
        assert proc.poll() is None and not metrics.exists()      # held: step 3 of 8 in 2 epochs
        (gate / "release").touch()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert metrics.exists()
        assert [p.name for p in gate.glob("reached-*")] == reached, "the gate held twice"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
