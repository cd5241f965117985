"""``hvdkit doctor``: passes on this machine, and names a missing launcher or Horovod in one problem line."""
import json
import os
import re
import shutil
import sys

import pytest

from hvdkit.doctor import parse_mpirun_version
from proc import explain, run

VENV_BIN = os.path.dirname(sys.executable)  # an activated venv puts this first on PATH
ACTIVATED = {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
DOCTOR = [sys.executable, "-m", "hvdkit.cli", "doctor"]  # absolute python: PATH may be stripped


def problem_lines(out: str):
    return [line for line in out.splitlines() if line.startswith("problem:")]


def _bin_dir(tmp_path, tools):
    """A directory with symlinks to ``tools`` only, to be the whole PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool, path=ACTIVATED["PATH"])
        assert found, f"{tool} must exist on this machine for the test to mean anything"
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def _commands():
    cmds = [DOCTOR]
    script = os.path.join(VENV_BIN, "hvdkit")
    if os.access(script, os.X_OK):
        cmds.append([script, "doctor"])
    return cmds


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: os.path.basename(c[0]))
def test_doctor_ok_on_this_machine(cmd):
    result = run(cmd, timeout=180, env=ACTIVATED)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert re.search(r"^\s+horovod\s+0\.28\.1\b", out, re.M), out
    assert "[X] PyTorch" in out and "[X] TensorFlow" in out, out
    assert re.search(r"controllers\s+\[X\] MPI\s+\[X\] Gloo", out), out
    assert re.search(r"tensor ops\s+.*\[X\] MPI\s+\[X\] Gloo", out), out
    assert re.search(r"^\s+mpirun\s+/\S+\s+\(Open MPI \d", out, re.M), out
    assert problem_lines(out) == [], out
    assert out.rstrip().splitlines()[-1] == "doctor: OK", out
    # Keras 3 is installed here: the trap is a warning, not a problem.
    assert any(line.startswith("warning:") and "DistributedOptimizer" in line for line in out.splitlines()), out


def test_doctor_json():
    result = run(DOCTOR + ["--json"], timeout=180, env=ACTIVATED)
    assert result.returncode == 0, explain(result)
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    hvd = report["horovod"]
    assert hvd["version"] == "0.28.1"
    assert hvd["frameworks"]["PyTorch"] is True and hvd["frameworks"]["TensorFlow"] is True
    assert hvd["controllers"] == {"MPI": True, "Gloo": True}
    assert hvd["tensor_operations"]["MPI"] is True and hvd["tensor_operations"]["Gloo"] is True
    assert report["mpi"]["implementation"] == "Open MPI"
    assert "Open MPI" in report["mpi4py"]["library"]
    assert report["packages"]["keras"].startswith("3.")
    assert any("Keras" in w for w in report["warnings"])
    assert report["network"]["single_host_iface"] in report["network"]["interfaces"]
    assert report["cpu"]["usable"] >= 1 and report["memory"]["total_gib"] > 0
    assert report["launchers"]["horovodrun"] and report["launchers"]["mpirun"]


def test_horovodrun_missing_is_one_problem(tmp_path):
    path = _bin_dir(tmp_path, ["mpirun"])
    assert shutil.which("horovodrun", path=path) is None
    result = run(DOCTOR, timeout=180, env={"PATH": path})
    assert result.returncode == 1, explain(result)
    lines = problem_lines(result.stdout)
    assert len(lines) == 1, explain(result)
    assert "horovodrun" in lines[0] and "; fix: " in lines[0], lines[0]
    assert "activate" in lines[0], lines[0]  # the venv has horovodrun, so the fix is to activate it
    assert result.stdout.rstrip().splitlines()[-1] == "doctor: 1 problem(s)"

    as_json = run(DOCTOR + ["--json"], timeout=180, env={"PATH": path})
    assert as_json.returncode == 1, explain(as_json)
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and len(report["problems"]) == 1 and "horovodrun" in report["problems"][0]


def test_mpirun_missing_is_one_problem(tmp_path):
    path = _bin_dir(tmp_path, ["horovodrun"])
    assert shutil.which("mpirun", path=path) is None
    result = run(DOCTOR, timeout=180, env={"PATH": path})
    assert result.returncode == 1, explain(result)
    lines = problem_lines(result.stdout)
    assert len(lines) == 1, explain(result)
    assert lines[0].startswith("problem: mpirun") and "; fix: " in lines[0], lines[0]


def test_crashing_horovod_import_is_reported(tmp_path):
    # A horovod that aborts on import: the doctor must survive it and say so in one line.
    fake = tmp_path / "horovod"
    fake.mkdir()
    (fake / "__init__.py").write_text("import os\nos.abort()\n")
    env = dict(ACTIVATED, PYTHONPATH=str(tmp_path))
    result = run(DOCTOR, timeout=180, env=env)
    assert result.returncode == 1, explain(result)
    lines = problem_lines(result.stdout)
    assert len(lines) == 1, explain(result)
    assert "horovod is not importable" in lines[0] and "SIGABRT" in lines[0] and "; fix: " in lines[0]


def test_parse_mpirun_version():
    assert parse_mpirun_version("mpirun (Open MPI) 4.1.4\n\nReport bugs to x\n") == {
        "implementation": "Open MPI", "version": "4.1.4"}
    mpich = "HYDRA build details:\n    Version:                                 4.0.2\n"
    assert parse_mpirun_version(mpich) == {"implementation": "MPICH", "version": "4.0.2"}
