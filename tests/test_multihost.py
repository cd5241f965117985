"""``hvdkit launch --hostfile`` across machines: hostfile formats and ``--print`` here, then real runs over ssh on
namespace hosts (tests/multihost.py: hvdkit-h1, hvdkit-h2, each with sshd and eth0; the launcher in a namespace
of its own), with horovodrun (Gloo and MPI controllers) and mpirun, compared with the same run on localhost."""
import json
import os
import shlex
import sys

import pytest

import multihost
from proc import REPO, explain, run

from hvdkit import hostfile
from hvdkit.cli import main as cli_main

HVDKIT = [sys.executable, "-m", "hvdkit.cli"]
EXAMPLE = os.path.join(REPO, "examples", "torch_digits.py")
FLAGS = ["--epochs", "3"]
TIMEOUT = 240          # one 3-epoch run takes 20-40 s here; ssh and rendezvous add a few
netns_hosts = multihost.netns_hosts   # the module-scoped fixture: hosts up once for this module
LAUNCHERS = {"horovodrun-gloo": ["--launcher", "horovodrun"],
             "horovodrun-mpi": ["--launcher", "horovodrun", "--controller", "mpi"],
             "mpirun": ["--launcher", "mpirun"]}


# ---------------------------------------------------------------- no hosts needed

def test_hostfile_formats_and_errors(tmp_path):
    assert hostfile.parse("a slots=2 max_slots=4\nb:3\n\n# c\nc  # one\n10.0.0.1 slots=1\n") == \
        [("a", 2), ("b", 3), ("c", 1), ("10.0.0.1", 1)]
    for bad in ("a slots=0", "a:x", "a cpus=2", "a:2 slots=2", "-a"):
        with pytest.raises(ValueError, match="fix that line"):
            hostfile.parse(bad, "hf")


def print_launch(capsys, *args):
    assert cli_main(["launch", *args, "--print", "train.py"]) == 0
    return shlex.split(capsys.readouterr().out)


def test_print_horovodrun_with_hostfile(tmp_path, capsys, no_scheduler):
    (tmp_path / "hf").write_text("n1 slots=2\nn2:2\n")
    cmd = print_launch(capsys, "--hostfile", str(tmp_path / "hf"), "--network-interface", "eth0",
                       "--ssh-port", "2222", "--ssh-identity-file", "/k")
    line = " ".join(cmd)
    assert "-np 4 -H n1:2,n2:2 --network-interface eth0 --ssh-port 2222 --ssh-identity-file /k --gloo" in line


def test_print_mpirun_with_hostfile_forwards_env(tmp_path, capsys, no_scheduler):
    monkeypatch = no_scheduler
    (tmp_path / "hf").write_text("n1 slots=1\nn2 slots=1\n")
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MY_SETTING", "x")
    cmd = print_launch(capsys, "--launcher", "mpirun", "--hostfile", str(tmp_path / "hf"), "--network-interface",
                       "eth0", "--ssh-identity-file", "/k", "-x", "MY_SETTING", "-x", "A=1")
    xs = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-x"]
    assert {"HOROVOD_CYCLE_TIME", "OMP_NUM_THREADS", "MY_SETTING", "A=1", "PYTHONUNBUFFERED=1"} <= set(xs)
    line = " ".join(cmd)
    assert "-H n1:1,n2:1" in line and "--mca plm_rsh_args -i /k" in line
    assert "--mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0" in line


@pytest.mark.parametrize("args, problem", [
    (["--hostfile", "/no/such"], "hostfile /no/such not found"),
    (["--hostfile", "HF", "-np", "5"], "-np 5 is more than the 2 slot(s)"),
    (["--hostfile", "HF", "-H", "a:1"], "-H and --hostfile both say where to run"),
    (["--launcher", "mpirun", "--controller", "mpi"], "--controller mpi applies to static horovodrun"),
    (["-x", "NOT_SET_ANYWHERE_4711"], "NOT_SET_ANYWHERE_4711 is not set here"),
])
def test_bad_cluster_options_are_one_line(tmp_path, capsys, no_scheduler, args, problem):
    (tmp_path / "hf").write_text("n1 slots=1\nn2 slots=1\n")
    args = [str(tmp_path / "hf") if a == "HF" else a for a in args]
    assert cli_main(["launch", *args, "--print", "train.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hvdkit: error: ") and problem in err and "\n" not in err, err


@pytest.fixture
def no_scheduler(monkeypatch):
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                 "OMPI_MCA_orte_default_hostfile"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_nodelist_expansion():
    assert hostfile.expand_nodelist("a[1-2]-b[08-09],c") == ["a1-b08", "a1-b09", "a2-b08", "a2-b09", "c"]
    with pytest.raises(Exception, match="bad range"):
        hostfile.expand_nodelist("n[3-1]")


def test_print_uses_the_slurm_allocation(capsys, no_scheduler):
    no_scheduler.setenv("SLURM_JOB_NODELIST", "cn[07-09]")
    no_scheduler.setenv("SLURM_TASKS_PER_NODE", "2(x2),1")
    cmd = print_launch(capsys, "--launcher", "mpirun")
    assert " ".join(cmd).count("-np 5 -H cn07:2,cn08:2,cn09:1 ") == 1
    no_scheduler.setenv("SLURM_NTASKS_PER_NODE", "1")            # --ntasks-per-node wins
    assert "-np 3 -H cn07:1,cn08:1,cn09:1 " in " ".join(print_launch(capsys))
    assert "-H localhost:2" in " ".join(print_launch(capsys, "-H", "localhost:2"))   # the command line wins


def test_print_uses_an_injected_openmpi_hostfile(tmp_path, capsys, no_scheduler):
    (tmp_path / "hostfile").write_text("job-worker-0 slots=1\njob-worker-1 slots=1\n")   # MPI Operator's format
    no_scheduler.setenv("OMPI_MCA_orte_default_hostfile", str(tmp_path / "hostfile"))
    no_scheduler.setenv("SLURM_JOB_NODELIST", "ignored[1-2]")
    assert "-np 2 -H job-worker-0:1,job-worker-1:1 " in " ".join(print_launch(capsys))


# ---------------------------------------------------------------- over ssh, on namespace hosts

def metrics(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def local_accuracy(tmp_path_factory):
    """Test accuracy of the same example and flags on localhost (2 workers, Gloo)."""
    out = str(tmp_path_factory.mktemp("local") / "metrics.json")
    result = run([*HVDKIT, "launch", "-np", "2", EXAMPLE, *FLAGS, "--metrics-json", out], timeout=TIMEOUT)
    assert result.returncode == 0, explain(result)
    return metrics(out)["test_accuracy"]


def cluster_launch(hosts, tmp_path, launcher, *script, hostfile_text=None):
    """``hvdkit launch --hostfile`` from the launcher namespace with the hosts' key and interface."""
    hf = tmp_path / "hostfile"
    hf.write_text(hostfile_text or "".join(f"{name} slots=1\n" for name in hosts.names))
    cmd = [*HVDKIT, "launch", "--hostfile", str(hf), "--network-interface", "eth0",
           "--ssh-identity-file", hosts.key, *LAUNCHERS[launcher], *script]
    return hosts.run(cmd, timeout=TIMEOUT)


@pytest.mark.parametrize("launcher", ["horovodrun-gloo", "mpirun"])
def test_ranks_run_on_the_remote_hosts(netns_hosts, tmp_path, launcher):
    script = tmp_path / "where.py"     # the hosts share this filesystem, as a cluster shares home
    script.write_text("import socket\nprint('on', socket.gethostname(), flush=True)\n")
    result = cluster_launch(netns_hosts, tmp_path, launcher, str(script),
                            hostfile_text="hvdkit-h1:1\nhvdkit-h2\n")   # Horovod's format this time
    assert result.returncode == 0, explain(result)
    on = sorted(line.split("on ", 1)[1].strip() for line in result.stdout.splitlines() if ">:on " in line)
    assert on == ["hvdkit-h1", "hvdkit-h2"], explain(result)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_torch_digits_across_two_hosts(netns_hosts, tmp_path, local_accuracy, launcher):
    out = str(tmp_path / "metrics.json")
    result = cluster_launch(netns_hosts, tmp_path, launcher, EXAMPLE, *FLAGS, "--metrics-json", out)
    assert result.returncode == 0, explain(result)
    found = metrics(out)
    assert found["world_size"] == 2 and found["epochs"] == 3
    assert abs(found["test_accuracy"] - local_accuracy) <= 0.03, (found["test_accuracy"], local_accuracy)
