"""Launch commands (hvdkit.launch): pure argv construction, nothing is run."""
import os
import shlex
import subprocess
import sys

import pytest

from hvdkit.errors import HvdkitError
from hvdkit.launch import FORWARDED_ENV, discovery_command, launch_command

SCRIPT = ["train.py", "--epochs", "1"]


# ---------------------------------------------------------------- helpers

def tool_name(cmd):
    return os.path.basename(cmd[0])


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

def test_horovodrun_default_command():
    cmd = launch_command(SCRIPT, np=2, launcher="horovodrun", python="python")
    assert tool_name(cmd) == "horovodrun"
    assert cmd[1:] == ["-np", "2", "-H", "localhost:2", "--gloo", "python", "train.py", "--epochs", "1"]


def test_horovodrun_is_the_default_launcher_and_np_default_is_2():
    cmd = launch_command(SCRIPT, python="python")
    assert tool_name(cmd) == "horovodrun"
    assert value_after(cmd, "-np") == "2" and value_after(cmd, "-H") == "localhost:2"


def test_horovodrun_hosts_passed_through():
    cmd = launch_command(SCRIPT, np=4, hosts="node1:2,node2:2", python="python")
    assert value_after(cmd, "-np") == "4"
    assert value_after(cmd, "-H") == "node1:2,node2:2"


def test_horovodrun_extra_goes_before_python_and_env_is_a_prefix():
    cmd = launch_command(SCRIPT, np=3, python="python", env={"B": "2", "A": "1"},
                         extra=["--verbose"])
    assert cmd[:3] == ["env", "A=1", "B=2"]
    rest = cmd[3:]
    assert tool_name(rest) == "horovodrun"
    assert rest[1:] == ["-np", "3", "-H", "localhost:3", "--gloo", "--verbose",
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
    assert cmd[0] == str(horovodrun)
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
    cmd = mpirun(monkeypatch, env={"OMP_NUM_THREADS": "1", "A": "x y"}, extra=["--tag-output"])
    assert x_values(cmd) == ["PYTHONPATH", "A=x y", "OMP_NUM_THREADS=1"]
    assert cmd[-5:] == ["--tag-output", "python", *SCRIPT]


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
    out = subprocess.run([sys.executable, "-m", "hvdkit.cli", "launch", "-np", "2", "--hosts-file", str(hosts),
                          "--max-np", "4", "--network-interface", "lo", "--print", "train.py", "--epochs", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
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
