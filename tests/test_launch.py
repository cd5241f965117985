"""Launch commands (hvdkit.launch, argv construction) and ``hvdkit launch`` itself (hvdkit.supervise): preflight
checks, one summary line for a failed job on both launchers, the log file, signals, and ``hvdkit bench -h``.

The tests that start processes run the CLI in a session of its own with a timeout (tests/proc.py); the cheap
ones use a tiny worker script written to tmp_path instead of a training example.
"""
import glob
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest

from hvdkit.errors import HvdkitError
from hvdkit.launch import FORWARDED_ENV, discovery_command, launch_command
from hvdkit import supervise as sv
from proc import REPO, kill_marked, marked_processes, run

SCRIPT = ["train.py", "--epochs", "1"]


# ---------------------------------------------------------------- helpers

def tool_name(cmd):
    """The launcher's name, past an ``env K=V ...`` prefix."""
    while cmd[0] == "env" or "=" in cmd[0]:
        cmd = cmd[1:]
    return os.path.basename(cmd[0])


SINGLE_COPY = "OMPI_MCA_btl_vader_single_copy_mechanism"


def value_after(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def x_values(cmd):
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-x"]


def mpirun(monkeypatch, np=2, euid=1000, cpus=64, **kw):
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    return launch_command(SCRIPT, np=np, launcher="mpirun", python="python", **kw)


@pytest.fixture
def clean_env(monkeypatch):
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- horovodrun

def test_horovodrun_default_command_is_a_static_job_on_mpi(monkeypatch):
    # MPI controller and tensor ops: 1.19x Gloo's samples/s on the bench CNN at 2 workers (README "Tuned defaults");
    # horovodrun then runs mpirun, with the single-copy setting hvdkit's own mpirun command has
    monkeypatch.delenv(SINGLE_COPY, raising=False)
    cmd = launch_command(SCRIPT, np=2, launcher="horovodrun", python="python")
    assert cmd[:2] == ["env", f"{SINGLE_COPY}=none"] and tool_name(cmd) == "horovodrun"
    assert cmd[3:] == ["-np", "2", "-H", "localhost:2", "--mpi", "python", "train.py", "--epochs", "1"]
    monkeypatch.setenv(SINGLE_COPY, "cma")    # the user's setting is kept
    assert launch_command(SCRIPT, np=2, python="python")[1] == f"{SINGLE_COPY}=cma"


def test_horovodrun_runs_gloo_when_asked_and_for_elastic_jobs():
    from hvdkit.launch import Elastic
    cmd = launch_command(SCRIPT, np=2, python="python", controller="gloo")
    assert cmd == ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "python", "train.py", "--epochs", "1"]
    cmd = launch_command(SCRIPT, np=2, python="python", elastic=Elastic("discover"))
    assert "--gloo" in cmd and "--mpi" not in cmd and not any(SINGLE_COPY in c for c in cmd)
    with pytest.raises(HvdkitError, match="--controller mpi applies to static horovodrun launches only"):
        launch_command(SCRIPT, np=2, python="python", elastic=Elastic("discover"), controller="mpi")
    with pytest.raises(HvdkitError, match="--controller gloo applies to horovodrun only"):
        launch_command(SCRIPT, np=2, python="python", launcher="mpirun", controller="gloo")


def test_elastic_jobs_get_a_60_s_gloo_timeout_unless_one_is_set(monkeypatch):
    # The Gloo timeout also bounds the wait for a joining worker: Horovod's 30 s failed a job here (hvdkit.launch).
    from hvdkit.launch import Elastic
    monkeypatch.delenv("HOROVOD_GLOO_TIMEOUT_SECONDS", raising=False)
    cmd = launch_command(SCRIPT, np=2, python="python", elastic=Elastic("discover"))
    assert cmd[:2] == ["env", "HOROVOD_GLOO_TIMEOUT_SECONDS=60"] and tool_name(cmd) == "horovodrun"
    assert not any("GLOO_TIMEOUT" in c for c in launch_command(SCRIPT, np=2, python="python"))   # static: untouched
    cmd = launch_command(SCRIPT, np=2, python="python", elastic=Elastic("discover"),
                         env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "90"})
    assert [c for c in cmd if "GLOO_TIMEOUT" in c] == ["HOROVOD_GLOO_TIMEOUT_SECONDS=90"]
    cmd = launch_command(SCRIPT, np=2, python="python", elastic=Elastic("d"), extra=["--gloo-timeout-seconds", "5"])
    assert not any("GLOO_TIMEOUT" in c for c in cmd) and "--gloo-timeout-seconds" in cmd   # horovodrun's flag wins
    monkeypatch.setenv("HOROVOD_GLOO_TIMEOUT_SECONDS", "10")   # horovodrun passes it on as it is
    assert not any("GLOO_TIMEOUT" in c for c in launch_command(SCRIPT, np=2, python="python", elastic=Elastic("d")))


def test_horovodrun_is_the_default_launcher_and_np_default_is_2():
    cmd = launch_command(SCRIPT, python="python")
    assert tool_name(cmd) == "horovodrun"
    assert value_after(cmd, "-np") == "2" and value_after(cmd, "-H") == "localhost:2"


def test_horovodrun_hosts_passed_through():
    cmd = launch_command(SCRIPT, np=4, hosts="node1:2,node2:2", python="python")
    assert value_after(cmd, "-np") == "4"
    assert value_after(cmd, "-H") == "node1:2,node2:2"


def test_static_horovodrun_refuses_gloo_tensor_ops_and_pins_the_daemons_to_the_interface(monkeypatch):
    # Gloo tensor ops under the MPI controller crash in this build: one line before anything starts
    from hvdkit.launch import preflight
    monkeypatch.setenv("HOROVOD_CPU_OPERATIONS", "gloo")
    with pytest.raises(HvdkitError, match="HOROVOD_CPU_OPERATIONS=gloo .* unset it, or pass --controller gloo"):
        preflight(SCRIPT, np=2, check_files=False)
    assert preflight(SCRIPT, np=2, check_files=False, controller="gloo") == []
    monkeypatch.delenv("HOROVOD_CPU_OPERATIONS")
    cmd = launch_command(SCRIPT, np=2, python="python", network_interface="eth0")
    assert "OMPI_MCA_oob_tcp_if_include=eth0" in cmd[:cmd.index("--mpi")]
    assert value_after(cmd, "--network-interface") == "eth0"     # horovodrun pins the ranks' links itself


def test_horovodrun_extra_goes_before_python_and_env_is_a_prefix(monkeypatch):
    monkeypatch.delenv(SINGLE_COPY, raising=False)
    cmd = launch_command(SCRIPT, np=3, python="python", env={"B": "2", "A": "1"},
                         extra=["--verbose"])
    assert cmd[:4] == ["env", "A=1", "B=2", f"{SINGLE_COPY}=none"]
    rest = cmd[4:]
    assert tool_name(rest) == "horovodrun"
    assert rest[1:] == ["-np", "3", "-H", "localhost:3", "--mpi", "--verbose",
                        "python", "train.py", "--epochs", "1"]


def test_python_defaults_to_current_interpreter():
    cmd = launch_command(SCRIPT, np=1)
    assert cmd[-4:] == [sys.executable, *SCRIPT]


def test_tool_next_to_python_is_preferred(tmp_path):
    python = tmp_path / "python"
    horovodrun = tmp_path / "horovodrun"
    for path in (python, horovodrun):
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    cmd = launch_command(SCRIPT, np=1, python=str(python))
    assert cmd[2] == str(horovodrun)
    assert cmd[-4:] == [str(python), *SCRIPT]


# ---------------------------------------------------------------- mpirun

def test_mpirun_basic_command(monkeypatch, clean_env):
    cmd = mpirun(monkeypatch, np=2)
    assert tool_name(cmd) == "mpirun"
    assert value_after(cmd, "-np") == "2" and value_after(cmd, "-H") == "localhost:2"
    assert value_after(cmd, "--bind-to") == "none"
    assert cmd[-4:] == ["python", *SCRIPT]
    assert "--gloo" not in cmd


def test_mpirun_allow_run_as_root_only_for_root(monkeypatch, clean_env):
    assert "--allow-run-as-root" in mpirun(monkeypatch, euid=0)
    assert "--allow-run-as-root" not in mpirun(monkeypatch, euid=1000)


def test_mpirun_oversubscribe_only_beyond_cpu_count(monkeypatch, clean_env):
    assert "--oversubscribe" not in mpirun(monkeypatch, np=4, cpus=4)
    assert "--oversubscribe" in mpirun(monkeypatch, np=5, cpus=4)
    assert "--oversubscribe" in mpirun(monkeypatch, np=2, cpus=None)  # unknown count counts as 1


def test_mpirun_env_forwarded_with_x(monkeypatch, clean_env):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    cmd = mpirun(monkeypatch, env={"OMP_NUM_THREADS": "1", "A": "x y"}, extra=["--report-bindings"])
    assert x_values(cmd) == ["PYTHONPATH", "A=x y", "OMP_NUM_THREADS=1"]
    assert cmd[-5:] == ["--report-bindings", "python", *SCRIPT]


def test_mpirun_tags_output_with_ranks(monkeypatch, clean_env):
    # hvdkit launch pins a failure on a rank from these tags; horovodrun tags its workers' lines by itself
    assert mpirun(monkeypatch).count("--tag-output") == 1
    assert "--tag-output" not in launch_command(SCRIPT, python="python")


def test_mpirun_without_env_has_no_x(monkeypatch, clean_env):
    assert x_values(mpirun(monkeypatch)) == []


def test_mpirun_hosts_passed_through(monkeypatch, clean_env):
    cmd = mpirun(monkeypatch, np=4, hosts="a:2,b:2")
    assert value_after(cmd, "-H") == "a:2,b:2"


# ---------------------------------------------------------------- errors

def test_unknown_launcher_raises():
    with pytest.raises(HvdkitError, match="unknown launcher 'srun'.*horovodrun, mpirun"):
        launch_command(SCRIPT, np=2, launcher="srun")


@pytest.mark.parametrize("np", [0, -1])
def test_np_below_one_raises(np):
    with pytest.raises(HvdkitError, match="-np must be >= 1"):
        launch_command(SCRIPT, np=np, python="python")


def test_cli_builds_the_elastic_line(tmp_path):
    hosts = tmp_path / "hosts.txt"
    env = {k: v for k, v in os.environ.items() if k != "HOROVOD_GLOO_TIMEOUT_SECONDS"}
    out = subprocess.run([sys.executable, "-m", "hvdkit.cli", "launch", "-np", "2", "--hosts-file", str(hosts),
                          "--max-np", "4", "--network-interface", "lo", "--print", "train.py", "--epochs", "1"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("env HOROVOD_GLOO_TIMEOUT_SECONDS=60 "), line
    assert "--min-np 1" in line and "--max-np 4" in line and "--elastic-timeout 600" in line
    assert "--network-interface lo" in line and "--blacklist-cooldown-range 60 300" in line
    assert f" -m hvdkit.discover_hosts {hosts}" in line and line.endswith("train.py --epochs 1")
    assert " -H " not in line


def test_discovery_command_runs_the_module_on_the_absolute_hosts_file(tmp_path, monkeypatch):
    # A module, not a path into the checkout: it works for a non-editable install too.
    monkeypatch.chdir(tmp_path)
    cmd = discovery_command("my hosts.txt", python="/opt/py 3/bin/python")
    assert shlex.split(cmd) == ["/opt/py 3/bin/python", "-m", "hvdkit.discover_hosts", str(tmp_path / "my hosts.txt")]
    assert shlex.split(discovery_command("h"))[:3] == [sys.executable, "-m", "hvdkit.discover_hosts"]


def test_elastic_under_mpirun_is_refused():
    from hvdkit.launch import Elastic
    with pytest.raises(HvdkitError, match="horovodrun"):
        launch_command(["t.py"], np=2, launcher="mpirun", elastic=Elastic("discover"))



# ---------------------------------------------------------------- hvdkit launch: helpers

DIGITS = "examples/torch_digits.py"
BAD_BATCH = "hvdkit: error: batch_size must be >= 1 (got 0); pass e.g. --batch-size 32"
# Launcher noise that must not reach the terminal (it stays in the log).
NOISE = ("Traceback", "RuntimeError: Horovod detected", "Primary job", "mpirun detected", "Job has been shutdown",
         "exit with status code")

WORKER = """
import os, sys, time
rank = int(os.environ.get("HOROVOD_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
mode = sys.argv[1]
if mode == "fail" and rank == 1:
    print("hvdkit: error: bad input on rank 1; pass a good one", file=sys.stderr)
    sys.exit(2)
if mode == "sleep":
    print(f"ready {rank}", flush=True)
    time.sleep(300)
time.sleep(1)
print(f"rank {rank} done", flush=True)
"""


def worker(tmp_path):
    """A worker script that needs no framework: ``fail`` (rank 1 exits 2 with one error line), ``sleep``, ``ok``."""
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return str(path)


def hvdkit(tmp_path, *args, timeout=60):
    """``hvdkit ARGS`` as a user runs it, temp files (the default log) in tmp_path; killed on timeout."""
    return run([sys.executable, "-m", "hvdkit.cli", *args], timeout=timeout, env={"TMPDIR": str(tmp_path)})


def summaries(result):
    """hvdkit's own error lines (a worker's are tagged [rank]<stderr>:... and do not count)."""
    return [l for l in (result.stdout + result.stderr).splitlines() if l.startswith("hvdkit: error:")]


def logs_in(directory):
    return glob.glob(os.path.join(str(directory), "hvdkit-launch-*.log"))


def explain(result):
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def replay(transcript, launcher="horovodrun", returncode=1, verbose=False):
    """Feed a recorded launcher output through hvdkit.supervise's reader: (stdout, stderr, summary, exit code)."""
    out, err, tracker = io.StringIO(), io.StringIO(), sv.FailureTracker()
    sv._pump(io.BytesIO(transcript.encode()), sv._Output(io.StringIO(), out, err), tracker, verbose)
    line, code = sv.summary(tracker, launcher, returncode, "/tmp/the.log")
    return out.getvalue(), err.getvalue(), line, code


# Recorded here: horovodrun -np 2 --gloo ... examples/torch_digits.py --batch-size 0 (stdout and stderr merged).
HOROVODRUN_FAILURE = f"""\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
[0]<stderr>:{BAD_BATCH}
Process 0 exit with status code 2.
Terminating remaining workers after failure of Process 0.
[1]<stderr>:{BAD_BATCH}
Process 1 exit with status code 2.
Traceback (most recent call last):
  File "/work/main/.venv/bin/horovodrun", line 6, in <module>
    sys.exit(run_commandline())
             ^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/horovod/runner/gloo_run.py", line 284, in launch_gloo
    raise RuntimeError('Horovod detected that one or more processes exited with non-zero '
RuntimeError: Horovod detected that one or more processes exited with non-zero status, thus causing the job to \
be terminated. The first process to do so was:
Process name: 0
Exit code: 2
"""

# Recorded here: mpirun --tag-output ... with rank 1 raising ValueError: mpirun tags every write, not every line.
MPIRUN_FAILURE = """\
[1,0]<stdout>:starting[1,1]<stderr>:Traceback (most recent call last):
[1,1]<stderr>:  File "/tmp/m1/exc.py", line 6, in <module>
[1,1]<stderr>:    [1,1]<stderr>:raise ValueError("something broke on rank 1")[1,1]<stderr>:
[1,1]<stderr>:ValueError[1,1]<stderr>:: [1,1]<stderr>:something broke on rank 1[1,1]<stderr>:
--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[14041,1],1]
  Exit code:    1
--------------------------------------------------------------------------
"""

# Recorded here: an elastic horovodrun whose discovery fails; two threads' tracebacks interleave.
ELASTIC_DISCOVERY_FAILURE = """\
discover_hosts: cannot read hosts file /tmp/missing.txt (No such file or directory); create it with one host:slots
Exception in thread Traceback (most recent call last):
  File "/work/main/.venv/bin/horovodrun", line 6, in <module>
    sys.exit(run_commandline())
Thread-1 (_discover_hosts):
Traceback (most recent call last):
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 1045, in _bootstrap_inner
    return _run_elastic(args)
  File "/work/main/.venv/lib/python3.11/site-packages/horovod/runner/elastic/driver.py", line 175, in wait_for_a
    raise RuntimeError('Job has been shutdown, see above error messages for details.')
RuntimeError: Job has been shutdown, see above error messages for details.
"""


# ---------------------------------------------------------------- hvdkit launch: recorded outputs (no processes)

def test_horovodrun_failure_shows_worker_lines_and_one_summary():
    out, err, line, code = replay(HOROVODRUN_FAILURE, "horovodrun", 1)
    assert err.splitlines() == ["WARNING: All log messages before absl::InitializeLog() is called are written to "
                                "STDERR", f"[0]<stderr>:{BAD_BATCH}", f"[1]<stderr>:{BAD_BATCH}"]
    assert out == ""
    assert line == f"hvdkit: error: rank 0 failed first (exit 2): {BAD_BATCH}; full output: /tmp/the.log"
    assert code == 2          # the worker's own code for bad input, not horovodrun's 1


def test_mpirun_failure_rebuilds_tagged_lines_and_names_the_rank():
    out, err, line, code = replay(MPIRUN_FAILURE, "mpirun", 1)
    assert out.splitlines() == ["[1,0]<stdout>:starting"]
    assert err.splitlines() == ["[1,1]<stderr>:Traceback (most recent call last):",
                                '[1,1]<stderr>:  File "/tmp/m1/exc.py", line 6, in <module>',
                                '[1,1]<stderr>:    raise ValueError("something broke on rank 1")',
                                "[1,1]<stderr>:ValueError: something broke on rank 1"]
    assert line == ("hvdkit: error: rank 1 failed first (exit 1): ValueError: something broke on rank 1; "
                    "full output: /tmp/the.log")
    assert code == 1


def test_verbose_replay_shows_everything_and_still_summarizes():
    out, err, line, code = replay(MPIRUN_FAILURE, "mpirun", 1, verbose=True)
    assert "Primary job  terminated normally" in err and "[1,1]<stderr>:ValueError[1,1]<stderr>::" in err
    assert line.startswith("hvdkit: error: rank 1 failed first (exit 1): ValueError: something broke")


def test_launcher_failure_without_a_worker_names_the_launchers_own_line():
    out, err, line, code = replay(ELASTIC_DISCOVERY_FAILURE, "horovodrun", 1)
    assert err.splitlines() == ["discover_hosts: cannot read hosts file /tmp/missing.txt (No such file or "
                                "directory); create it with one host:slots"]
    assert line == ("hvdkit: error: horovodrun failed (exit 1): discover_hosts: cannot read hosts file "
                    "/tmp/missing.txt (No such file or directory); create it with one host:slots; "
                    "full output: /tmp/the.log")
    assert code == 1


def test_an_mpirun_message_that_is_not_about_a_failed_worker_is_shown():
    banner = ("-" * 74 + "\nThere are not enough slots available in the system to satisfy the 3\nslots that were "
              "requested by the application:\n" + "-" * 74 + "\n")
    out, err, line, code = replay(banner, "mpirun", 1)
    assert err == banner
    assert line.startswith("hvdkit: error: mpirun failed (exit 1): There are not enough slots available")


def test_worker_killed_by_a_signal_exits_1():
    transcript = "[1]<stdout>:about to die\n[1]<stderr>:Killed\nProcess 1 exit with status code 137.\n"
    assert replay(transcript)[2:] == ("hvdkit: error: rank 1 failed first (killed by signal 9): Killed; "
                                      "full output: /tmp/the.log", 1)


def test_the_failing_rank_is_named_not_the_rank_that_stopped_because_of_it():
    # horovodrun may report the rank that stopped first; hvdkit's line says it only followed another rank
    transcript = ("[0]<stderr>:hvdkit: error: rank 0 stopped at epoch 1, step 5: another rank failed or left the job "
                  "(its own error line is the first in the job's output)\n"
                  "[1]<stderr>:hvdkit: error: rank 1 failed at epoch 1, step 5: ValueError: bad sample\n"
                  "Process 0 exit with status code 1.\nProcess 1 exit with status code 1.\n")
    # the trainer's line names the failing rank already: it is the summary
    assert replay(transcript)[2:] == ("hvdkit: error: rank 1 failed at epoch 1, step 5: ValueError: bad sample; "
                                      "full output: /tmp/the.log", 1)


def test_elastic_every_rank_prints_the_failing_ranks_line_and_the_summary_keeps_its_rank():
    # elastic: every rank stops with the failing rank's line; horovodrun numbers processes by their first rank
    line = "hvdkit: error: rank 1 failed at epoch 1, step 4: RuntimeError: boom"
    transcript = f"[0]<stderr>:{line}\n[1]<stderr>:{line}\nProcess 0 exit with status code 1.\n"
    assert replay(transcript)[2:] == (f"{line}; full output: /tmp/the.log", 1)


COMPLETE = "[0]<stderr>:[hvdkit rank 0] training complete: 2 epochs, step 90, 2 workers; outputs written\n"


def test_a_worker_killed_after_training_completed_is_a_warning_and_exit_0():
    out, err, line, code = replay(COMPLETE + "Process 1 exit with status code -9.\n")
    assert code == 0 and line == ("hvdkit: warning: training completed and its outputs were written; rank 1 (killed "
                                  "by signal 9) lost while the job was ending, so horovodrun exited 1: treated as "
                                  "success; full output: /tmp/the.log")


def test_a_kill_in_a_second_fit_after_a_first_completed_fails_the_job():
    start = "[0]<stderr>:[hvdkit rank 0] training starts on 2 workers\n"
    transcript = start + COMPLETE + start + "Process 1 exit with status code -9.\n"
    assert replay(transcript)[3] == 1


def test_a_failure_before_completion_is_not_excused_by_it():
    # a worker died by a signal before the end; the others finished without it (static horovodrun would have
    # stopped them): only failures after the line count as lost while ending
    transcript = "Process 1 exit with status code -9.\n" + COMPLETE
    assert replay(transcript)[3] == 1


def test_an_error_after_training_completed_still_fails_the_job():
    transcript = COMPLETE + "[1]<stderr>:ValueError: post-processing failed\nProcess 1 exit with status code 1.\n"
    assert replay(transcript)[2:] == ("hvdkit: error: rank 1 failed first (exit 1): ValueError: post-processing "
                                      "failed; full output: /tmp/the.log", 1)


def test_exit_codes():
    assert [sv.exit_code_for(c) for c in (1, 2, 3, 125, 126, 137, -9)] == [1, 2, 3, 125, 1, 1, 1]
    tracker = sv.FailureTracker()
    assert sv.summary(tracker, "horovodrun", 0, "/l") == (None, 0)
    assert sv.summary(tracker, "horovodrun", 1, "/l", interrupted=signal.SIGINT)[1] == 130
    assert sv.summary(tracker, "horovodrun", 1, "/l", interrupted=signal.SIGTERM)[1] == 143


# ---------------------------------------------------------------- hvdkit launch: preflight (nothing starts)

@pytest.mark.parametrize("args, message", [
    (["-np", "2", "no_such_script.py"], "script no_such_script.py not found"),
    (["--hosts-file", "{tmp}/missing.txt", DIGITS], "hosts file {tmp}/missing.txt not found"),
    (["--hosts-file", "{tmp}/bad_hosts.txt", DIGITS], "{tmp}/bad_hosts.txt:2: 'node 1:x' is not a host name"),
    (["-np", "0", DIGITS], "-np must be >= 1 (got 0)"),
    (["-np", "2", "--max-np", "1", "--hosts-file", "{tmp}/hosts.txt", DIGITS], "--max-np 1 is below -np 2"),
    (["-np", "2", "--min-np", "3", "--hosts-file", "{tmp}/hosts.txt", DIGITS], "-np 2 is below --min-np 3"),
    (["--max-np", "4", DIGITS], "--max-np applies only to elastic launches"),
    (["--launcher", "mpirun", "--hosts-file", "{tmp}/hosts.txt", DIGITS], "runs under horovodrun (Gloo) only"),
    (["--log", "{tmp}/no/such/dir/x.log", DIGITS], "cannot write log file {tmp}/no/such/dir/x.log"),
], ids=["missing-script", "missing-hosts-file", "bad-hosts-file", "np-0", "max-below-np", "min-above-np",
        "elastic-flag-alone", "elastic-under-mpirun", "bad-log-path"])
def test_preflight_problem_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "bad_hosts.txt").write_text("localhost:2\nnode 1:x\n")
    (tmp_path / "hosts.txt").write_text("localhost:2\n")
    result = hvdkit(tmp_path, "launch", *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, explain(result)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, explain(result)   # no command: not started
    line = result.stderr.strip()
    assert line.startswith("hvdkit: error: ") and message.format(tmp=tmp_path) in line and "; " in line, line
    assert logs_in(tmp_path) == []


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_launcher_not_found_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, launcher):
    from hvdkit import cli

    def must_not_run(*args, **kw):
        raise AssertionError("the launcher was started")

    # a python whose directory holds no launcher, and a PATH without one
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sv, "supervise", must_not_run)
    assert cli.main(["launch", "--launcher", launcher, os.path.join(REPO, DIGITS)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"hvdkit: error: {launcher} not found next to {tmp_path / 'python'} or on PATH; "
                            + ("install Horovod into this environment (mpi/setup.sh) or use --launcher mpirun\n"
                               if launcher == "horovodrun" else
                               "install OpenMPI (apt-get install openmpi-bin) or use --launcher horovodrun "
                               "--controller gloo\n"))


def test_static_horovodrun_without_mpirun_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from hvdkit import cli
    (tmp_path / "horovodrun").write_text("#!/bin/sh\nexit 9\n")   # horovodrun there, mpirun nowhere
    (tmp_path / "horovodrun").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sv, "supervise", lambda *a, **k: (_ for _ in ()).throw(AssertionError("started")))
    assert cli.main(["launch", os.path.join(REPO, DIGITS)]) == 2
    assert capsys.readouterr().err == (
        f"hvdkit: error: mpirun not found next to {tmp_path / 'python'} or on PATH (a static horovodrun job runs it); "
        "install OpenMPI (apt-get install openmpi-bin) or use --launcher horovodrun --controller gloo\n")
    monkeypatch.setattr(sv, "supervise", lambda *a, **k: 0)    # on Gloo horovodrun alone is enough
    assert cli.main(["launch", "--controller", "gloo", os.path.join(REPO, DIGITS)]) == 0


def test_print_checks_numbers_but_not_files(tmp_path):
    result = hvdkit(tmp_path, "launch", "--print", "-np", "2", "no_such_script.py")
    assert result.returncode == 0 and result.stdout.strip().endswith("no_such_script.py"), explain(result)
    assert hvdkit(tmp_path, "launch", "--print", "-np", "0", "x.py").returncode == 2


# ---------------------------------------------------------------- hvdkit bench -h

@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_bench_help_shows_benchs_options(tmp_path, flag):
    result = hvdkit(tmp_path, "bench", flag)
    assert result.returncode == 0, explain(result)
    assert "usage: hvdkit bench" in result.stdout and "allreduce" in result.stdout and "train" in result.stdout
    assert result.stderr == ""


def test_bench_subcommand_help_lists_its_flags(tmp_path):
    result = hvdkit(tmp_path, "bench", "allreduce", "-h")
    assert result.returncode == 0 and "--sizes" in result.stdout and "--iters" in result.stdout, explain(result)


# ---------------------------------------------------------------- hvdkit launch: real jobs

@pytest.mark.parametrize("launcher", ["horovodrun", "horovodrun-gloo", "mpirun"])
def test_bad_flag_ends_with_one_summary_line_naming_the_rank(tmp_path, launcher):
    # horovodrun: the static default, MPI underneath (mpirun's report); horovodrun-gloo: Horovod's own report
    log = tmp_path / "launch.log"
    how = ["--launcher", "horovodrun", "--controller", "gloo"] if launcher == "horovodrun-gloo" else \
        ["--launcher", launcher]
    result = hvdkit(tmp_path, "launch", *how, "-np", "2", "--log", str(log), DIGITS, "--batch-size", "0",
                    timeout=180)
    assert result.returncode == 2, explain(result)   # the workers' own code for bad input, on both launchers
    lines = summaries(result)
    assert len(lines) == 1, explain(result)
    # each rank's own line is still shown, tagged; the summary quotes the first failing rank's. A rank the
    # launcher terminated before it got to validate its flags says nothing (a race CI hit), so not every rank
    # is required to have spoken: only the one the summary names.
    said = dict(re.findall(r"^\[(?:\d+,)?(\d)\]<stderr>:(hvdkit: error: batch_size must be >= 1.*)$",
                           result.stderr, re.M))
    assert said and set(said) <= {"0", "1"}, explain(result)
    rank = re.match(r"hvdkit: error: rank (\d) failed first", lines[0]).group(1)
    assert rank in said, explain(result)
    assert lines[0] == f"hvdkit: error: rank {rank} failed first (exit 2): {said[rank]}; full output: {log}"
    assert result.stderr.splitlines()[-1] == lines[0]
    terminal = result.stdout + result.stderr
    assert not [n for n in NOISE if n in terminal], explain(result)
    full = log.read_text()    # the log keeps everything, the launcher's report included
    assert full.count("batch_size must be >= 1") == len(said)   # the log holds what the terminal showed
    assert ("RuntimeError: Horovod detected" if launcher == "horovodrun-gloo" else "mpirun detected") in full


def test_elastic_failure_names_the_rank_and_keeps_a_default_log(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:2\n")
    result = hvdkit(tmp_path, "launch", "-np", "2", "--hosts-file", str(hosts), "--network-interface", "lo",
                    worker(tmp_path), "fail", timeout=180)
    assert result.returncode == 2, explain(result)
    [log] = logs_in(tmp_path)
    assert summaries(result) == [f"hvdkit: error: rank 1 failed first (exit 2): hvdkit: error: bad input on rank 1; "
                                 f"pass a good one; full output: {log}"], explain(result)
    assert not [n for n in NOISE if n in result.stdout + result.stderr], explain(result)
    assert "Process name: localhost[1]" in open(log).read()


def test_verbose_streams_the_launchers_own_report(tmp_path):
    result = hvdkit(tmp_path, "launch", "--launcher", "mpirun", "-np", "2", "--verbose", worker(tmp_path), "fail",
                    timeout=120)
    assert result.returncode == 2, explain(result)
    assert "mpirun detected that one or more processes exited" in result.stderr, explain(result)
    assert summaries(result) and summaries(result)[-1].startswith("hvdkit: error: rank 1 failed first (exit 2): "
                                                                  "hvdkit: error: bad input on rank 1")


def test_successful_launch_exits_0_shows_the_output_and_removes_the_default_log(tmp_path):
    result = hvdkit(tmp_path, "launch", "-np", "2", DIGITS, "--epochs", "1", "--no-progress", timeout=240)
    assert result.returncode == 0, explain(result)
    # the static default runs mpirun under horovodrun: mpirun's [jobid,rank] tags
    assert re.search(r"^\[\d+,0\]<stdout>:test accuracy 0\.\d+ on 360 samples", result.stdout, re.M), explain(result)
    assert summaries(result) == [] and logs_in(tmp_path) == []


@pytest.mark.parametrize("launcher, sig, code", [("horovodrun", signal.SIGINT, 130), ("mpirun", signal.SIGTERM, 143)])
def test_signal_stops_the_job_and_leaves_no_worker(tmp_path, launcher, sig, code):
    marker = f"job-{os.getpid()}-{uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path), HVDKIT_TEST_JOB=marker)
    cmd = [sys.executable, "-m", "hvdkit.cli", "launch", "--launcher", launcher, "-np", "2", worker(tmp_path), "sleep"]
    out = open(tmp_path / "out.txt", "w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (tmp_path / "out.txt").read_text().count("ready") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.2)
        os.kill(proc.pid, sig)          # to hvdkit only, as a terminal's Ctrl-C or a scheduler's TERM reaches it
        assert proc.wait(timeout=60) == code, (tmp_path / "out.txt").read_text()
        time.sleep(1.0)
        assert marked_processes(marker) == [], "workers left running"
        text = (tmp_path / "out.txt").read_text()
        assert f"hvdkit: error: interrupted by {sig.name}; the job was stopped; full output: " in text, text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_marked(marker)
        out.close()
