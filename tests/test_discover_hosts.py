"""mpi/discover_hosts.py, the host discovery script elastic jobs run: good files and every kind of bad one."""
import os
import sys

import pytest

from proc import REPO, run

SCRIPT = os.path.join(REPO, "mpi", "discover_hosts.py")


def discover(tmp_path, text=None, args=None):
    path = tmp_path / "hosts.txt"
    if text is not None:
        path.write_text(text)
    return run([sys.executable, SCRIPT, *(args if args is not None else [str(path)])], timeout=30)


def test_hosts_comments_blanks_and_default_slots(tmp_path):
    out = discover(tmp_path, "# cluster\nnode1:4\n\n  10.0.0.7 : 2   # rack 3\nlocalhost\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["node1:4", "10.0.0.7:2", "localhost:1"]


def test_path_from_environment(tmp_path):
    (tmp_path / "h").write_text("127.0.0.1:1\n")
    out = run([sys.executable, SCRIPT], env={"HVDKIT_HOSTS_FILE": str(tmp_path / "h")}, timeout=30)
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
    out = run([sys.executable, SCRIPT], env={"HVDKIT_HOSTS_FILE": ""}, timeout=30)
    assert out.returncode == 2 and "HVDKIT_HOSTS_FILE" in out.stderr
