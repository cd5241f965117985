"""hvdkit.discover_hosts, the host discovery command elastic jobs run: good files, every kind of bad one,
and the forms it is run in (``python -m``, the mpi/ shim, the console script of a non-editable install)."""
import os
import shlex
import shutil
import sys

import pytest

from hvdkit.discover_hosts import parse
from hvdkit.launch import discovery_command
from proc import REPO, explain, run

DISCOVER = [sys.executable, "-m", "hvdkit.discover_hosts"]
SHIM = os.path.join(REPO, "mpi", "discover_hosts.py")
HEAVY = ("numpy", "torch", "tensorflow", "horovod", "keras")


def discover(tmp_path, text=None, args=None):
    path = tmp_path / "hosts.txt"
    if text is not None:
        path.write_text(text)
    return run([*DISCOVER, *(args if args is not None else [str(path)])], timeout=30)


def test_hosts_comments_blanks_and_default_slots(tmp_path):
    out = discover(tmp_path, "# cluster\nnode1:4\n\n  10.0.0.7 : 2   # rack 3\nlocalhost\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["node1:4", "10.0.0.7:2", "localhost:1"]


def test_path_from_environment(tmp_path):
    (tmp_path / "h").write_text("127.0.0.1:1\n")
    out = run(DISCOVER, env={"HVDKIT_HOSTS_FILE": str(tmp_path / "h")}, timeout=30)
    assert out.returncode == 0 and out.stdout == "127.0.0.1:1\n"


@pytest.mark.parametrize("line, why", [
    ("node1:two", "slots"), ("node1:0", "slots"), ("node_1:2", "not a host name"),
    ("999.1.2.3:1", "not a host name"), ("[::1]:2", "not a host name"), ("node1:2:3", "slots"),
])
def test_malformed_line_is_reported_with_its_line_number(tmp_path, line, why):
    out = discover(tmp_path, f"node0:1\n{line}\n")
    assert out.returncode == 1
    assert out.stdout == ""                                   # nothing half-parsed reaches horovodrun
    assert "hosts.txt:2:" in out.stderr and why in out.stderr and len(out.stderr.splitlines()) == 1


def test_empty_file_prints_nothing_on_purpose(tmp_path):
    out = discover(tmp_path, "# every host drained\n\n")
    assert out.returncode == 0 and out.stdout == ""
    assert "lists no hosts" in out.stderr


def test_missing_file(tmp_path):
    out = discover(tmp_path, None)
    assert out.returncode == 2 and "cannot read hosts file" in out.stderr


def test_no_file_given(tmp_path):
    out = run(DISCOVER, env={"HVDKIT_HOSTS_FILE": ""}, timeout=30)
    assert out.returncode == 2 and "HVDKIT_HOSTS_FILE" in out.stderr


def test_parse_in_process():
    assert parse("a:2\n# b:3\n\n192.168.0.1\n") == [("a", 2), ("192.168.0.1", 1)]
    with pytest.raises(ValueError, match=r"^f:1: "):
        parse("bad host\n", "f")


def test_mpi_shim_still_works(tmp_path):
    # Launch lines written before the move say `python mpi/discover_hosts.py FILE`.
    (tmp_path / "h").write_text("node1:2\n")
    out = run([sys.executable, SHIM, str(tmp_path / "h")], timeout=30, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout == "node1:2\n", explain(out)


def test_runs_on_the_standard_library_alone(tmp_path):
    # horovodrun runs it every second on the launching host: no framework, not even numpy.
    (tmp_path / "h").write_text("node1:2\n")
    code = ("import sys, runpy\n"
            f"sys.argv = ['discover_hosts', {str(tmp_path / 'h')!r}]\n"
            "try:\n    runpy.run_module('hvdkit.discover_hosts', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    out = run([sys.executable, "-c", code], timeout=30)
    assert out.returncode == 0, explain(out)
    assert out.stdout.splitlines() == ["node1:2", "[]"]


# ---------------------------------------------------------------- a non-editable install

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """hvdkit as `pip install .` leaves it, in a --target directory: no mpi/ directory beside the package."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    # Build from a copy of what setup.cfg reads: building in the checkout would leave build/ and *.egg-info.
    shutil.copytree(os.path.join(REPO, "hvdkit"), src / "hvdkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    target = root / "site"
    out = run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--no-cache-dir", "--quiet", "--target", str(target), str(src)],
              timeout=90, cwd=str(root), env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert out.returncode == 0, explain(out)
    assert not (target / "mpi").exists()
    return target


def test_discovery_command_works_from_a_non_editable_install(installed, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node1:2\n127.0.0.1\n")
    elsewhere = tmp_path / "elsewhere"  # horovodrun's cwd need not be the checkout
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(installed)}
    cmd = discovery_command(str(hosts), python=sys.executable)
    assert shlex.split(cmd)[1:] == ["-m", "hvdkit.discover_hosts", str(hosts)]  # no path into the checkout
    out = run(["sh", "-c", cmd], timeout=30, env=env, cwd=str(elsewhere))  # horovodrun runs it through a shell
    assert out.returncode == 0 and out.stdout == "node1:2\n127.0.0.1:1\n", explain(out)
    # The installed copy ran, not the checkout this venv has an editable install of.
    where = run([sys.executable, "-c", "import hvdkit.discover_hosts as m; print(m.__file__)"],
                timeout=30, env=env, cwd=str(elsewhere))
    assert where.stdout.strip() == str(installed / "hvdkit" / "discover_hosts.py"), explain(where)


def test_console_script_from_a_non_editable_install(installed, tmp_path):
    script = installed / "bin" / "hvdkit-discover-hosts"
    assert os.access(script, os.X_OK), sorted(os.listdir(installed / "bin"))
    (tmp_path / "h").write_text("node2:4\n")
    out = run([str(script), str(tmp_path / "h")], timeout=30, env={"PYTHONPATH": str(installed)},
              cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout == "node2:4\n", explain(out)
