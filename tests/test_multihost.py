"""``hvdkit launch --hostfile`` across machines: hostfile formats and ``--print`` here, then real runs over ssh on
namespace hosts (tests/multihost.py: hvdkit-h1, hvdkit-h2, each with sshd and eth0; the launcher in a namespace
of its own): the torch and Keras digits examples with horovodrun (Gloo and MPI controllers) and mpirun, 2 hosts x 1
or 2 slots, compared with the same run on localhost; elastic jobs across the hosts (a third host joining, a host cut
off the network and re-admitted); the launcher's environment and --ssh-port reaching remote ranks; the harness's
teardown leaving nothing behind; hvdkit doctor --hosts; the sbatch script and MPIJob manifest under mpi/
(docs/cluster.md), checked with --print."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

import multihost
from elastic_harness import GATED, ElasticJob
from proc import REPO, explain, file_contents, run

from hvdkit import hostfile
from hvdkit.audit import check, load as audit_load
from hvdkit.cli import main as cli_main

HVDKIT = [sys.executable, "-m", "hvdkit.cli"]
EXAMPLES = {"torch": os.path.join(REPO, "examples", "torch_digits.py"),
            "keras": os.path.join(REPO, "examples", "keras_digits.py")}
EXAMPLE = EXAMPLES["torch"]      # the elastic jobs'
FLAGS = ["--epochs", "3"]
# Per worker: 2 hosts x 2 slots halve the batch (32 -> 16) and the one-worker LR (0.05 -> 0.025; the examples scale
# it linearly by the world size), so 4 workers train with the global batch (64) and LR (0.1) of 2 and visit the
# samples in the same order: on localhost 4 such workers reach 2 workers' accuracy exactly (test loss equal to
# 1e-7, the float sums' order), while 4 workers with the defaults (batch 128, LR 0.2, half the steps in 3 epochs)
# end well below it (torch 0.725 against 0.922). So every scenario is compared with one localhost run of 2 workers.
PER_WORKER = {1: [], 2: ["--batch-size", "16", "--lr", "0.025"]}
GLOBAL_BATCH = 64
TRAIN_SAMPLES = 1437   # the digits' training split
# Same world size or the matched batch and LR: the same computation up to the order of the float sums (Gloo's ring
# over TCP or MPI's allreduce, fusion buffers), so at most a borderline test sample or two may flip. Measured: every
# scenario below gave localhost's accuracy and test loss to 4 and 6 digits. 0.01 = 3.6 of the 360 test samples; the
# loss within 1% (a rank training the wrong shard, or gradients summed instead of averaged, move it far more).
ACCURACY_TOLERANCE = 0.01
LOSS_TOLERANCE = 0.01  # relative
TIMEOUT = 300          # one 3-epoch launch took 20-77 s here, the 2 cores shared with other jobs
netns_hosts = multihost.netns_hosts   # the module-scoped fixture: hosts up once for this module
LAUNCHERS = {"horovodrun-gloo": ["--launcher", "horovodrun", "--controller", "gloo"],
             "horovodrun-mpi": ["--launcher", "horovodrun", "--controller", "mpi"],
             "mpirun": ["--launcher", "mpirun"]}


# ---------------------------------------------------------------- no hosts needed

def test_hostfile_formats_and_errors(tmp_path):
    assert hostfile.parse("a slots=2 max_slots=4\nb:3\n\n# c\nc  # one\n10.0.0.1 slots=1\n") == \
        [("a", 2), ("b", 3), ("c", 1), ("10.0.0.1", 1)]
    for bad in ("a slots=0", "a:x", "a cpus=2", "a:2 slots=2", "-a", "a slots="):
        with pytest.raises(ValueError, match="fix that line"):
            hostfile.parse(bad, "hf")
    # a host listed twice: one entry with the slots added up, as OpenMPI counts them
    assert hostfile.parse("a slots=2\nb\na:1\n") == [("a", 3), ("b", 1)]


def print_launch(capsys, *args):
    assert cli_main(["launch", *args, "--print", "train.py"]) == 0
    return shlex.split(capsys.readouterr().out)


def test_print_horovodrun_with_hostfile(tmp_path, capsys, no_scheduler):
    (tmp_path / "hf").write_text("n1 slots=2\nn2:2\n")
    cmd = print_launch(capsys, "--hostfile", str(tmp_path / "hf"), "--network-interface", "eth0",
                       "--ssh-port", "2222", "--ssh-identity-file", "/k")
    line = " ".join(cmd)
    assert "-np 4 -H n1:2,n2:2 --network-interface eth0 --ssh-port 2222 --ssh-identity-file /k --mpi" in line


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
    (["--hosts-file", "HF", "--controller", "mpi"], "an elastic job, --hosts-file, runs on Gloo only"),
    (["--launcher", "mpirun", "--controller", "gloo"], "--controller gloo applies to horovodrun only"),
    (["-x", "NOT_SET_ANYWHERE_4711"], "NOT_SET_ANYWHERE_4711 is not set here"),
    (["-H", "a:1,b:2", "-np", "4"], "-np 4 is more than the 3 slot(s) in -H a:1,b:2"),
    (["-H", "a:x"], "-H a:x: 'a:x' is not 'host' or 'host:N' with N a whole number >= 1; fix it"),
    (["-H", "a:1,b:0", "-np", "1"], "'b:0' is not 'host' or 'host:N'"),
    (["-H", "a:2,,b"], "'' is not 'host' or 'host:N'"),
    (["--launcher", "mpirun", "--hostfile", "HF", "--ssh-identity-file", "/my keys/id"],
     "has whitespace in its path"),
])
def test_bad_cluster_options_are_one_line(tmp_path, capsys, no_scheduler, args, problem):
    (tmp_path / "hf").write_text("n1 slots=1\nn2 slots=1\n")
    args = [str(tmp_path / "hf") if a == "HF" else a for a in args]
    assert cli_main(["launch", *args, "--print", "train.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hvdkit: error: ") and problem in err and "\n" not in err, err


def print_passthrough(capsys, args, flags, script=("train.py",)):
    """``hvdkit launch ARGS --print -- FLAGS -- SCRIPT``, split like a shell would."""
    assert cli_main(["launch", *args, "--print", "--", *flags, "--", *script]) == 0
    return " ".join(shlex.split(capsys.readouterr().out))


def test_print_reset_limit_and_passthrough(tmp_path, capsys, no_scheduler):
    (tmp_path / "hosts.txt").write_text("n1:1\nn2:1\n")
    line = print_passthrough(capsys, ["--hosts-file", str(tmp_path / "hosts.txt"), "--reset-limit", "3",
                                      "--network-interface", "eth0"],
                             ["--blacklist-cooldown-range", "5", "10", "--log-level", "INFO"])
    assert "--reset-limit 3 " in line and "--network-interface eth0 --gloo --blacklist-cooldown-range 5 10 " \
        "--log-level INFO " in line, line
    assert line.count("--blacklist-cooldown-range") == 1, line     # the user's range replaces the default
    line = print_passthrough(capsys, ["--launcher", "mpirun", "-np", "2"], ["--report-bindings"],
                             ["train.py", "--", "x"])
    assert line.endswith(f"--report-bindings {sys.executable} train.py -- x"), line   # the script's -- stays
    line = print_passthrough(capsys, ["--hostfile", str(tmp_path / "hosts.txt"), "--controller", "mpi"],
                             ["--timeline-filename", "/tmp/tl.json"])
    assert "-np 2 -H n1:1,n2:1 --mpi --timeline-filename /tmp/tl.json " in line, line


@pytest.mark.parametrize("args, problem", [
    (["--reset-limit", "2"], "--reset-limit applies only to elastic launches"),
    (["--hosts-file", "HF", "--reset-limit", "-1"], "--reset-limit must be >= 0"),
    (["--", "--verbose"], "launcher flags after -- end with another --"),
    (["--", "oops", "--"], "'oops' after -- is not a launcher flag"),
])
def test_bad_reset_limit_and_passthrough(tmp_path, capsys, no_scheduler, args, problem):
    (tmp_path / "hf").write_text("n1:1\n")
    args = [str(tmp_path / "hf") if a == "HF" else a for a in args]
    assert cli_main(["launch", "-np", "1", "--print", *args, "train.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hvdkit: error: ") and problem in err and "\n" not in err, err


@pytest.fixture
def no_scheduler(monkeypatch):
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                 "OMPI_MCA_orte_default_hostfile"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_stale_injected_hostfile_names_the_variable(tmp_path, capsys, no_scheduler):
    """OMPI_MCA_orte_default_hostfile left over from another job: one line naming it and the ways out, which work."""
    no_scheduler.setenv("OMPI_MCA_orte_default_hostfile", "/nonexist")
    assert cli_main(["launch", "--print", "train.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hvdkit: error: OMPI_MCA_orte_default_hostfile=/nonexist: hostfile /nonexist not found; unset "
                   "OMPI_MCA_orte_default_hostfile if it is left over, or say where to run with --hostfile FILE or "
                   "-H host:N"), err
    assert "-np 2 -H n1:2 " in " ".join(print_launch(capsys, "-H", "n1:2"))


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


# ---------------------------------------------------------------- the harness script's state (no hosts brought up)

def netns_script(*args, env=None):
    """``python3 mpi/netns_hosts.py ARGS`` (as root, needs ``ip``): a subprocess with a timeout."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("mpi/netns_hosts.py needs root and ip (iproute2)")
    return subprocess.run(["python3", multihost.SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=60, env=env)


@pytest.fixture
def sleeper():
    """A live process that is not an sshd of any set: what an old state file's pid may name today."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def write_state(state_dir, prefix, sshd_pid):
    """A leftover state.json of ``prefix``'s set, its sshd's pid now ``sshd_pid``, nothing of it left but that."""
    os.makedirs(state_dir)
    state = dict(hosts=1, prefix=prefix, state_dir=str(state_dir), nodes=[], bridge=f"{prefix}-br0", ssh_ports=[22],
                 sshd_pids={f"{prefix}-h1": sshd_pid}, ready=True, made_etc_netns=False, made_run_sshd=False)
    with open(os.path.join(state_dir, "state.json"), "w") as f:
        json.dump(state, f)


def test_down_kills_no_process_that_reused_an_sshd_pid(tmp_path, sleeper):
    state_dir = tmp_path / "tzstale-netns"
    write_state(state_dir, "tzstale", sleeper.pid)
    done = netns_script("--state", str(state_dir), "--prefix", "tzstale", "down")
    assert done.returncode == 0, done.stderr
    assert sleeper.poll() is None, "down killed a process that is not its sshd"
    assert not state_dir.exists()


def test_each_prefix_has_its_own_state(tmp_path, sleeper):
    """``--prefix P`` without ``--state`` uses P's own directory: it neither reads nor removes the default set's;
    and a ``--state`` holding another prefix's set is refused before anything is torn down."""
    default = tmp_path / "hvdkit-netns"
    write_state(default, "tzdefault", sleeper.pid)
    env = dict(os.environ, HVDKIT_NETNS_STATE=str(default))
    status = netns_script("--prefix", "tzmine", "status", env=env)
    assert status.returncode == 1 and f"state {tmp_path / 'tzmine-netns'}" in status.stdout, status.stdout
    done = netns_script("--prefix", "tzmine", "down", env=env)
    assert done.returncode == 0 and (default / "state.json").exists(), done.stdout + done.stderr
    if multihost.skip_reason():
        return
    try:
        up = netns_script("--state", str(default), "--prefix", "tzmine", "up", "--hosts", "1", env=env)
        assert up.returncode == 2 and "holds the set 'tzdefault'" in up.stderr, up.stdout + up.stderr
        assert (default / "state.json").exists()
    finally:   # should the refusal fail, take down what it brought up
        if not (default / "state.json").exists():
            netns_script("--state", str(default), "--prefix", "tzmine", "down")
    assert sleeper.poll() is None


# ---------------------------------------------------------------- the sbatch script and the MPIJob manifest

SBATCH = os.path.join(REPO, "mpi", "slurm.sbatch")
MPIJOB = os.path.join(REPO, "mpi", "mpijob.yaml")


def test_sbatch_script_commands(tmp_path):
    """mpi/slurm.sbatch run by bash as SLURM would on the first node (fake allocation cn[01-02], 1 task per node),
    with ``hvdkit`` a function adding --print: the command it would run, accepted and placed on the allocation."""
    with open(SBATCH) as f:
        text = f.read()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "1", directives
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_MCA_"))}
    env.update(SLURM_JOB_NODELIST="cn[01-02]", SLURM_NTASKS_PER_NODE=directives["ntasks-per-node"],
               SLURM_CPUS_PER_TASK="4", SLURM_SUBMIT_DIR=REPO, SLURM_JOB_ID="42", HVDKIT_PY=sys.executable)
    fake = 'hvdkit() { [ "$1" = launch ] || exit 9; shift; "$HVDKIT_PY" -m hvdkit.cli launch --print "$@"; }'
    result = subprocess.run(["bash", "-c", f'{fake}; export -f hvdkit; exec bash "$0"', SBATCH], env=env,
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    line = " ".join(shlex.split(result.stdout))
    assert " -np 2 -H cn01:1,cn02:1 --network-interface eth0 --mpi " in line, line
    assert line.endswith("examples/torch_digits.py --epochs 3 --metrics-json metrics-42.json"), line


def _manifest_command(text, key="command:"):
    """The first ``key`` list in ``text`` (the launcher container's command), read without a YAML library (the
    manifest keeps it one item a line)."""
    block = text.split(key, 1)[1]
    items = []
    for line in block.splitlines()[1:]:
        stripped = line.strip()
        if not stripped.startswith("- "):
            break
        items.append(stripped[2:].strip().strip('"'))
    return items


def test_mpijob_manifest(tmp_path, capsys, no_scheduler):
    """mpi/mpijob.yaml: an MPIJob (kubeflow.org/v2beta1) whose launcher runs ``hvdkit launch``; with the hostfile
    the MPI Operator injects for 2 workers x slotsPerWorker, that command is accepted and runs on those pods."""
    with open(MPIJOB) as f:
        text = f.read()
    command = _manifest_command(text)
    try:
        import yaml
    except ImportError:   # not a dependency of the kit: the line-based read above stands in
        yaml = None
    if yaml is not None:
        job = yaml.safe_load(text)
        assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
        spec = job["spec"]
        launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
        assert launcher["command"] == command
        workers, slots = spec["mpiReplicaSpecs"]["Worker"]["replicas"], spec["slotsPerWorker"]
        assert spec["mpiImplementation"] == "OpenMPI"
        worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
        worker_argv = [*worker.get("command", []), *worker.get("args", [])]
    else:
        workers = int(re.search(r"Worker:\s+replicas: (\d+)", text).group(1))
        slots = int(re.search(r"slotsPerWorker: (\d+)", text).group(1))
        worker_text = text.split("    Worker:", 1)[1]
        worker_argv = _manifest_command(worker_text) + _manifest_command(worker_text, "args:")
    # the operator starts no sshd: the worker container must run it, in the foreground (else the pod exits)
    assert worker_argv[:1] == ["/usr/sbin/sshd"], worker_argv
    assert any(re.fullmatch(r"-\w*D\w*", arg) for arg in worker_argv[1:]), worker_argv
    assert command[:2] == ["hvdkit", "launch"], command
    name = re.search(r"^  name: (\S+)", text, re.M).group(1)
    hosts = [f"{name}-worker-{i}.{name}.default.svc" for i in range(workers)]
    (tmp_path / "hostfile").write_text("".join(f"{h} slots={slots}\n" for h in hosts))   # the operator's format
    no_scheduler.setenv("OMPI_MCA_orte_default_hostfile", str(tmp_path / "hostfile"))
    assert cli_main(["launch", "--print", *command[2:]]) == 0
    line = " ".join(shlex.split(capsys.readouterr().out))
    assert "mpirun -np 2 -H " + ",".join(f"{h}:{slots}" for h in hosts) + " " in line, line
    assert "--mca btl_tcp_if_include eth0" in line and line.endswith("examples/torch_digits.py --epochs 3"), line


def test_readme_cluster_section_links_the_details():
    """README "On a cluster" names firewall ports and timeouts, and its links into docs/cluster.md land on headings."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = re.search(r"^#+ On a cluster\n(.*?)^#+ ", readme, re.M | re.S)
    assert section, "README has no section 'On a cluster'"
    text = section.group(1)
    assert "Firewall ports" in text and "Timeouts" in text, text[:300]
    with open(os.path.join(REPO, "docs", "cluster.md"), encoding="utf-8") as f:
        slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
                 for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}   # GitHub's heading anchors
    anchors = re.findall(r"\(docs/cluster\.md#([\w-]+)\)", text)
    assert len(anchors) >= 2 and set(anchors) <= slugs, (anchors, slugs)


# ---------------------------------------------------------------- over ssh, on namespace hosts

def metrics(path):
    with open(path) as f:
        return json.load(f)


def _local_metrics(tmp_path_factory, framework):
    """Metrics of ``framework``'s digits example with the same flags on localhost (2 workers, Gloo)."""
    out = str(tmp_path_factory.mktemp(f"local-{framework}") / "metrics.json")
    result = run([*HVDKIT, "launch", "-np", "2", EXAMPLES[framework], *FLAGS, "--metrics-json", out],
                 timeout=TIMEOUT)
    assert result.returncode == 0, explain(result)
    found = metrics(out)
    assert found["world_size"] == 2 and found["global_batch_size"] == GLOBAL_BATCH, found
    return found


@pytest.fixture(scope="module")
def torch_local(tmp_path_factory):
    return _local_metrics(tmp_path_factory, "torch")


@pytest.fixture(scope="module")
def keras_local(tmp_path_factory):
    return _local_metrics(tmp_path_factory, "keras")


def hostfile_lines(names, slots, fmt):
    """Two hosts x ``slots`` in OpenMPI's format (``h slots=N``) or Horovod's (``h:N``; a bare ``h`` is 1 slot)."""
    if fmt == "openmpi":
        return "".join(f"{name} slots={slots}\n" for name in names)
    return f"{names[0]}:{slots}\n" + "".join(f"{name}\n" if slots == 1 else f"{name}:{slots}\n" for name in names[1:])


def cluster_launch(hosts, tmp_path, launcher, hostfile_text, *script):
    """``hvdkit launch --hostfile`` from the launcher namespace with the hosts' key and interface."""
    hf = tmp_path / "hostfile"
    hf.write_text(hostfile_text)
    cmd = [*HVDKIT, "launch", "--hostfile", str(hf), "--network-interface", "eth0",
           "--ssh-identity-file", hosts.key, *LAUNCHERS[launcher], *script]
    return hosts.run(cmd, timeout=TIMEOUT)


def ranks_by_host(audit_dir):
    """rank -> hostname of every worker of a run, from its --audit-dir files (``audit-<hostname>-<pid>.jsonl``,
    the hostname the worker itself saw; each file's ``start`` line names its rank)."""
    found = {}
    for line in audit_load(audit_dir):
        if line["kind"] == "start":
            host = os.path.basename(line["file"])[len("audit-"):].rsplit("-", 1)[0]
            assert line["rank"] not in found, (line, found)
            found[line["rank"]] = host
    return found


# (framework, launcher, slots per host, hostfile format): every launcher for torch, Keras under both controllers,
# each framework once at 2 hosts x 2 slots, and each launcher given both hostfile formats except horovodrun --mpi
# (horovod's; it hands mpirun the same host list as mpirun's own rows). A Keras horovodrun --mpi row (18 s) was
# dropped for suite time: under horovodrun --mpi the workers are mpirun's, which the Keras mpirun row runs.
ACROSS_HOSTS = [("torch", "horovodrun-gloo", 1, "openmpi"), ("torch", "horovodrun-mpi", 1, "horovod"),
                ("torch", "mpirun", 2, "openmpi"), ("keras", "horovodrun-gloo", 2, "horovod"),
                ("keras", "mpirun", 1, "horovod")]


def scenarios(framework):
    """parametrize arguments of ``framework``'s ACROSS_HOSTS rows, with ids such as ``mpirun-2x2``."""
    rows = [row[1:] for row in ACROSS_HOSTS if row[0] == framework]
    return dict(argvalues=rows, ids=[f"{launcher}-2x{slots}" for launcher, slots, _ in rows])


def digits_across_two_hosts(hosts, tmp_path, framework, launcher, slots, fmt, local):
    """The digits example on hvdkit-h1 and hvdkit-h2 x ``slots``: exit 0; ranks 0..slots-1 on h1, the rest on h2
    (as each worker saw its hostname); every training sample trained once per epoch across the hosts (the
    audit); the same global batch; test accuracy and loss as with 2 workers on localhost (``local``)."""
    names = hosts.names[:2]
    out, audit_dir = str(tmp_path / "metrics.json"), str(tmp_path / "audit")
    started = time.monotonic()
    result = cluster_launch(hosts, tmp_path, launcher, hostfile_lines(names, slots, fmt), EXAMPLES[framework],
                            *FLAGS, *PER_WORKER[slots], "--metrics-json", out, "--audit-dir", audit_dir)
    wall = time.monotonic() - started
    assert result.returncode == 0, explain(result)
    found = metrics(out)
    print(f"{framework} {launcher} 2x{slots}: accuracy {found['test_accuracy']:.4f}, loss {found['test_loss']:.6f} "
          f"(localhost, 2 workers: {local['test_accuracy']:.4f}, {local['test_loss']:.6f}); launch {wall:.1f} s wall")
    assert (found["world_size"], found["epochs"], found["global_batch_size"]) == (2 * slots, 3, GLOBAL_BATCH), found
    assert (found["train_samples_per_epoch"], found["test_samples"]) == (TRAIN_SAMPLES, 360), found
    assert ranks_by_host(audit_dir) == {rank: names[rank // slots] for rank in range(2 * slots)}, \
        (ranks_by_host(audit_dir), explain(result))
    report = check(audit_dir, TRAIN_SAMPLES, 3)
    assert report["ok"], report["problems"]
    assert abs(found["test_accuracy"] - local["test_accuracy"]) <= ACCURACY_TOLERANCE, (found, local)
    assert abs(found["test_loss"] - local["test_loss"]) <= LOSS_TOLERANCE * local["test_loss"], (found, local)


@pytest.mark.parametrize("launcher, slots, fmt", **scenarios("torch"))
def test_torch_digits_across_two_hosts(netns_hosts, tmp_path, torch_local, launcher, slots, fmt):
    digits_across_two_hosts(netns_hosts, tmp_path, "torch", launcher, slots, fmt, torch_local)


@pytest.mark.parametrize("launcher, slots, fmt", **scenarios("keras"))
def test_keras_digits_across_two_hosts(netns_hosts, tmp_path, keras_local, launcher, slots, fmt):
    digits_across_two_hosts(netns_hosts, tmp_path, "keras", launcher, slots, fmt, keras_local)


# ---------------------------------------------------------------- environment and ssh port on remote ranks

ENV_REPORT = os.path.join(REPO, "tests", "workers", "env_report.py")
CONNECTION = re.compile(r"^Connection from \S+ port \d+ on \S+ port (\d+)", re.M)


def _log_sizes(hosts, names):
    return {name: os.path.getsize(hosts.sshd_log(name)) for name in names}


def ports_logged_since(hosts, sizes):
    """host -> the ports of the ssh logins its sshd logged after ``sizes`` (offsets from :func:`_log_sizes`)."""
    found = {}
    for name, offset in sizes.items():
        with open(hosts.sshd_log(name)) as f:
            f.seek(offset)
            found[name] = [int(port) for port in CONNECTION.findall(f.read())]
    return found


def remote_ranks(out_dir, count):
    """rank -> what :mod:`tests/workers/env_report.py` wrote on that rank."""
    found = {}
    for rank in range(count):
        with open(os.path.join(out_dir, f"rank-{rank}.json")) as f:
            found[rank] = json.load(f)
    return found


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_env_and_ssh_port_reach_remote_ranks(netns_hosts, tmp_path, launcher):
    """One rank on each of hvdkit-h1 and hvdkit-h2 over ssh port 2222 (every sshd also listens on 22): each rank,
    started by the remote sshd with a clean environment, sees the launcher's HOROVOD_*, HVDKIT_*, OMP_* and
    PYTHONPATH values and the variable named with ``-x`` (a space in its value); under mpirun a variable not named
    stays behind (the ranks really are remote). Every login the sshds logged during the launch came in on 2222."""
    started = time.monotonic()
    names = netns_hosts.names[:2]
    port = netns_hosts.ssh_ports[1]
    out_dir = tmp_path / "ranks"
    out_dir.mkdir()
    (tmp_path / "hostfile").write_text(hostfile_lines(names, 1, "openmpi"))
    token = os.urandom(4).hex()
    sent = {"HOROVOD_CYCLE_TIME": "3.5", "HVDKIT_ENV_PROBE": f"hvdkit {token}", "OMP_NUM_THREADS": "3",
            "PYTHONPATH": str(tmp_path / f"pythonpath-{token}"), "NAMED_WITH_X": f"named {token}"}
    env = dict(sent, NOT_NAMED=f"stays {token}")
    sizes = _log_sizes(netns_hosts, names)
    cmd = [*HVDKIT, "launch", "--hostfile", str(tmp_path / "hostfile"), "--network-interface", "eth0",
           "--ssh-identity-file", netns_hosts.key, "--ssh-port", str(port), "-x", "NAMED_WITH_X",
           *LAUNCHERS[launcher], ENV_REPORT, str(out_dir), *sent, "NOT_NAMED"]
    result = netns_hosts.run(cmd, timeout=120, env=env)
    assert result.returncode == 0, explain(result)
    ranks = remote_ranks(str(out_dir), 2)
    for rank, report in ranks.items():
        assert report["hostname"] == names[rank], (rank, report)
        seen = report["env"]
        assert {k: seen.get(k) for k in sent} == sent, (rank, seen)
        if launcher == "mpirun":
            assert seen["NOT_NAMED"] is None, (rank, seen)    # so the values above came over by -x
    logins = ports_logged_since(netns_hosts, sizes)
    assert all(logins[name] and set(logins[name]) == {port} for name in names), logins
    print(f"{launcher}: env on 2 remote ranks, ssh logins {logins}; {time.monotonic() - started:.1f} s wall")


# ---------------------------------------------------------------- elastic across hosts

ELASTIC_EPOCHS = 3
ELASTIC_FLAGS = ["--epochs", str(ELASTIC_EPOCHS), "--batch-size", "16", "--commit-every", "5", "--no-progress"]
# HOROVOD_GLOO_TIMEOUT_SECONDS (Horovod's default 30): how long a rank waits on a silent peer, so about when a host cut
# off the network is noticed. The same variable bounds the ranks' wait in the rendezvous for a worker that joins (a
# host added or re-admitted), which first starts Python, imports torch and loads the data: 23 s with the 2 cores
# shared by other jobs (load ~10; 5 s of CPU). That wait's timeout is no error Horovod recovers from (gloo::IoException
# from http_store.cc: every rank terminates, exit 255, the job fails), so it must exceed a worker's start-up: 10 s
# and 30 s did not, under that load.
GLOO_TIMEOUT = 60


class ClusterElasticJob(ElasticJob):
    """An elastic ``hvdkit launch --hosts-file`` of the torch example (through tests/workers/gated.py) from the
    launcher namespace, ranks on the namespace hosts over ssh; the gate, hosts file, audit and kill helpers are
    :class:`elastic_harness.ElasticJob`'s."""

    def __init__(self, hosts, tmp, start_hosts, np, gate_step, passthrough=(), env=None):
        self.tmp, self.framework = tmp, "torch"
        self.gate_dir = os.path.join(tmp, "gate-run")
        self.hosts_file = os.path.join(tmp, "hosts.txt")
        self.audit_dir = os.path.join(tmp, "audit")
        self.ckpt = os.path.join(tmp, "ckpt")
        self.metrics = os.path.join(tmp, "metrics-run.json")
        self.log_path = os.path.join(tmp, "run.log")
        self.set_hosts(start_hosts)
        os.makedirs(self.gate_dir, exist_ok=True)
        launch = [*HVDKIT, "launch", "--hosts-file", self.hosts_file, "-np", str(np), "--min-np", "1",
                  "--max-np", "3", "--elastic-timeout", "60", "--network-interface", "eth0",
                  "--ssh-identity-file", hosts.key, "--verbose"]
        if passthrough:
            launch += ["--", *passthrough, "--"]
        self.cmd = hosts.argv([*launch, GATED, EXAMPLE, *ELASTIC_FLAGS, "--audit-dir", self.audit_dir,
                               "--metrics-json", self.metrics, "--checkpoint-dir", self.ckpt])
        env = dict(os.environ, PYTHONUNBUFFERED="1", HVDKIT_TEST_JOB=tmp, HVDKIT_GATE_DIR=self.gate_dir,
                   HVDKIT_GATE_STEP=str(gate_step), HVDKIT_GATE_AT="step",
                   HOROVOD_GLOO_TIMEOUT_SECONDS=str(GLOO_TIMEOUT), **(env or {}))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)

    def exactly_once(self, timeout=300):
        rc = self.finish(timeout=timeout)
        assert rc == 0, self.output()[-5000:]
        report = check(self.audit_dir, TRAIN_SAMPLES, ELASTIC_EPOCHS)
        assert report["ok"], report["problems"]
        with open(self.metrics) as f:
            metrics = json.load(f)
        assert metrics["epochs"] == ELASTIC_EPOCHS and metrics["train_samples_per_epoch"] == TRAIN_SAMPLES
        return report, metrics


@pytest.fixture
def cluster_job(netns_hosts, tmp_path):
    jobs = []

    def start(*args, **kw):
        job = ClusterElasticJob(netns_hosts, str(tmp_path), *args, **kw)
        jobs.append(job)
        return job
    yield start
    for job in jobs:
        job.kill()


def world_sizes(report):
    return {w for ws in report["world_sizes"].values() for w in ws}


def test_elastic_job_grows_onto_a_third_host(netns_hosts, cluster_job):
    started = time.time()
    h1, h2, h3 = netns_hosts.names[:3]
    job = cluster_job([f"{h1}:1", f"{h2}:1"], np=2, gate_step=20)   # two workers: 45 steps an epoch
    job.wait_gate([h1, h2])
    job.change_hosts([f"{h1}:1", f"{h2}:1", f"{h3}:1"])
    job.release()
    report, metrics = job.exactly_once()
    assert world_sizes(report) == {2, 3} and metrics["world_size"] == 3, report
    reset = job.resets()[0]
    assert (reset["from"], reset["to"], reset["epoch"], reset["step"]) == (2, 3, 1, 20), reset
    assert f"joined: {h3}/0" in job.output(), job.output()[-3000:]
    print(f"grow 2 -> 3 hosts: {time.time() - started:.1f} s wall")


def test_host_cut_off_mid_epoch_is_noticed_blacklisted_and_readmitted(netns_hosts, cluster_job):
    """h2's link is set down while both workers are held after step 20 (2 workers: 45 steps an epoch), its
    processes left running. The survivor's next collective times out (HOROVOD_GLOO_TIMEOUT_SECONDS), horovodrun's
    ssh to h2 gives up (ServerAliveInterval x ServerAliveCountMax, mpi/netns_hosts.py's ssh config), h2 is
    blacklisted and the survivor rolls back to the last commit and goes on alone. With the link up again and
    the cooldown (5-10 s) over, h2 is started again and the job grows back to 2."""
    started = time.time()
    h1, h2 = netns_hosts.names[:2]
    veth = netns_hosts.veth(h2)
    job = cluster_job([f"{h1}:1", f"{h2}:1"], np=2, gate_step=20,
                      passthrough=["--blacklist-cooldown-range", "5", "10", "--log-level", "INFO"],
                      env={"HVDKIT_STEP_SLEEP": "0.05"})   # 1-worker epochs of ~10 s: re-admission mid-run
    job.wait_gate([h1, h2])
    try:
        subprocess.run(["ip", "link", "set", veth, "down"], check=True, timeout=10)   # processes keep running
        cut = time.time()
        job.release()
        job.wait_for(lambda: job.resets(), "the survivor to notice the cut-off host", timeout=GLOO_TIMEOUT * 2)
        detected = time.time() - cut
        job.wait_for(lambda: job.newest_commit_world() == 1, "a commit by the survivor", timeout=60)
        committed = time.time() - cut
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True, timeout=10)
    linked = time.time()
    job.wait_for(lambda: len(job.resets()) >= 2, f"{h2} re-admitted after its cooldown", timeout=90)
    readmitted = time.time() - linked
    report, metrics = job.exactly_once()
    out = job.output()
    print(f"cut-off: noticed (2 -> 1) {detected:.1f} s after the cut (HOROVOD_GLOO_TIMEOUT_SECONDS={GLOO_TIMEOUT}, "
          f"ssh alive probes 3 x 2 s), survivor's first commit at +{committed:.1f} s, {h2} re-admitted "
          f"{readmitted:.1f} s after its link came up; {time.time() - started:.1f} s wall")
    shrink, grow = job.resets()[:2]
    assert (shrink["from"], shrink["to"], shrink["rolled_back"], shrink["epoch"]) == (2, 1, True, 1), shrink
    assert shrink["step"] in (15, 20), shrink        # the commit before the gate, or the gate step's own
    assert f"left: {h2}/0" in out and f"blacklist failing host: {h2}" in out, out[-5000:]
    assert (grow["from"], grow["to"]) == (1, 2) and f"joined: {h2}/0" in out, grow
    assert world_sizes(report) == {1, 2} and metrics["world_size"] == 2, report
    # the Gloo timeout (the ssh probes end sooner, 6-8 s); measured 60.7 s with 60 s (10.2-10.5 s with 10 s)
    assert detected <= GLOO_TIMEOUT + 30, detected


# ---------------------------------------------------------------- the harness leaves nothing behind

# Run by a pytest of its own: two sets of 2 hosts under their own prefixes (not the module's hvdkit-h*), each test
# leaving processes running in its namespaces (a command over ssh on h1, one on h2, one in the launcher's), the
# second test failing. What was made is recorded for the outer test to check after the fixtures' teardown.
TEARDOWN_MODULE = """
import json, os, subprocess, time
import multihost

RECORD = {record!r}
netns_pass = multihost.hosts_fixture(prefix="tdpass", hosts=2, scope="function")
netns_fail = multihost.hosts_fixture(prefix="tdfail", hosts=2, scope="function")


def start_time(pid):
    try:
        with open(f"/proc/{{pid}}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def cmdline(pid):
    try:
        with open(f"/proc/{{pid}}/cmdline") as f:
            return f.read()
    except OSError:   # gone meanwhile
        return ""


def in_namespaces(hosts):   # pid -> start time of every process in the set's namespaces, and its sshds
    pids = [int(p) for node in hosts.state["nodes"] for p in subprocess.run(
        ["ip", "netns", "pids", node["ns"]], stdout=subprocess.PIPE, text=True, timeout=10).stdout.split()]
    return {{pid: start_time(pid) for pid in [*hosts.state["sshd_pids"].values(), *pids]}}


def leave_processes(hosts):
    h1, h2 = hosts.names
    token = hosts.state["state_dir"]   # in each leftover's command line
    for argv in (hosts.argv(["ssh", "-i", hosts.key, h1, "exec sh -c 'sleep 300' " + token]),
                 hosts.argv(["sh", "-c", "sleep 300", token], on=h2), hosts.argv(["sh", "-c", "sleep 300", token])):
        subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:   # all three sleeping, the first on h1 under its sshd
        starts = in_namespaces(hosts)
        sleeping = [p for p in starts if cmdline(p).startswith("sleep")]
        if len(sleeping) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    with open(RECORD + "-" + hosts.state["prefix"], "w") as f:
        json.dump(dict(state=hosts.state, starts=starts, sleeping=len(sleeping)), f)


def test_passes(netns_pass):
    leave_processes(netns_pass)


def test_fails(netns_fail):
    leave_processes(netns_fail)
    raise RuntimeError("the test body fails")
"""


def _start_time(pid):
    """A live process's start time (clock ticks since boot), None when it is gone or a zombie: the start time tells
    the original process from another given its pid since."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def _outside_traces():
    """What the harness may touch outside its own names: the hosts file, root's ssh files, shared directories."""
    return {"/etc/hosts": file_contents("/etc/hosts"), "~/.ssh": file_contents(os.path.expanduser("~/.ssh")),
            "/etc/netns exists": os.path.isdir("/etc/netns"), "/run/sshd exists": os.path.isdir("/run/sshd")}


def leftovers(record):
    """Everything of one recorded set still there: processes, namespaces, links, /etc/netns files, state, keys."""
    state, found = record["state"], []
    found += [f"process {pid} ({_cmdlines().get(int(pid))})" for pid, start in record["starts"].items()
              if _start_time(int(pid)) == start]
    found += [f"process {pid} ({cmd})" for pid, cmd in _cmdlines().items() if state["state_dir"] in cmd]
    listed = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True, timeout=10).stdout.split()
    links = re.findall(r"^\d+: ([^:@]+)", subprocess.run(["ip", "-o", "link"], stdout=subprocess.PIPE, text=True,
                                                         timeout=10).stdout, re.M)
    found += [f"namespace {ns}" for ns in listed if ns.startswith(state["prefix"] + "-")]
    found += [f"link {link}" for link in links if link.startswith(state["prefix"] + "-")]
    found += [f"file {path}" for path in (state["state_dir"], state["key"], *(f"/etc/netns/{node['ns']}"
                                                                              for node in state["nodes"]))
              if os.path.exists(path)]
    return found


def _cmdlines():
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return found


def test_harness_teardown_leaves_nothing_behind(netns_hosts, tmp_path):
    """Two fixtures of their own prefixes (tdpass-*, tdfail-*), the second's test failing, both with processes left
    running in their namespaces: after their teardown no process, namespace, link, /etc/netns file, state directory
    or key of either is left; /etc/hosts and ~/.ssh are as before; the module's own hosts still answer."""
    started = time.monotonic()
    before = _outside_traces()
    record = str(tmp_path / "record")
    (tmp_path / "test_inner.py").write_text(TEARDOWN_MODULE.format(record=record))
    inner = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                 "--basetemp", str(tmp_path / "tmp"), str(tmp_path / "test_inner.py")], timeout=120,
                env={"PYTHONPATH": os.path.join(REPO, "tests"), "PYTHONDONTWRITEBYTECODE": "1"})
    assert "1 failed, 1 passed" in inner.stdout and "RuntimeError: the test body fails" in inner.stdout, \
        explain(inner)
    for prefix in ("tdpass", "tdfail"):
        with open(f"{record}-{prefix}") as f:
            found = json.load(f)
        # 2 sshds, 3 sleepers and their shells, the ssh client and sshd's session for it
        assert found["sleeping"] == 3 and len(found["starts"]) >= 8, found
        assert leftovers(found) == [], (prefix, explain(inner))
    assert _outside_traces() == before
    h1 = netns_hosts.names[0]
    alive = netns_hosts.run(["ssh", "-i", netns_hosts.key, h1, "hostname"], timeout=30)
    assert alive.stdout.strip() == h1, explain(alive)
    print(f"harness teardown (2 sets up and down, one test failing): {time.monotonic() - started:.1f} s wall")


# ---------------------------------------------------------------- hvdkit doctor --hosts

def test_doctor_hosts_all_alike(netns_hosts):
    result = netns_hosts.run([*HVDKIT, "doctor", "--hosts", ",".join(netns_hosts.names), "--ssh-identity-file",
                              netns_hosts.key, "--network-interface", "eth0"], timeout=120)
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    for name in netns_hosts.names:
        assert any(l.startswith(f"host {name}: hostname {name}, Python ") and "Horovod 0.28.1" in l for l in lines), \
            result.stdout
    assert lines[-1] == "doctor: OK", result.stdout


def test_doctor_hosts_names_each_problem(netns_hosts):
    """h1 given twice, an unknown host, h1 again by its address (one machine under two names) and an interface no
    host has: one problem line each, over ssh port 2222."""
    h1 = netns_hosts.names[0]
    ip1 = next(node["ip"] for node in netns_hosts.state["nodes"] if node["name"] == h1)
    result = netns_hosts.run([*HVDKIT, "doctor", "--hosts", f"{h1},hvdkit-h9,{h1}:2,{ip1}", "--ssh-identity-file",
                              netns_hosts.key, "--ssh-port", str(netns_hosts.ssh_ports[1]), "--network-interface",
                              "eth9"], timeout=120)
    assert result.returncode == 1, explain(result)
    problems = [l for l in result.stdout.splitlines() if l.startswith("problem: ")]
    assert all("; fix: " in p for p in problems) and len(problems) == 5, result.stdout
    assert problems[0].startswith(f"problem: {h1} is given 2 times in --hosts; fix: list each host once"), problems
    assert problems[1].startswith("problem: cannot ssh to hvdkit-h9 (ssh: Could not resolve hostname"), problems
    assert problems[2].startswith(f"problem: {h1} and {ip1} answer with the same hostname {h1}; fix: "), problems
    assert problems[3].startswith(f"problem: {h1} has no interface eth9 (it has eth0, lo)"), problems
    assert problems[4].startswith(f"problem: {ip1} has no interface eth9 (it has eth0, lo)"), problems
    assert result.stdout.splitlines()[-1] == "doctor: 5 problem(s)"


def test_doctor_hosts_sshes_as_horovodrun_does():
    """The same ssh options, port and key as horovodrun's own ssh (no host-key check): a host not yet in known_hosts
    is reachable for horovodrun, so doctor must not report it as unreachable."""
    from horovod.runner.util.remote import get_ssh_command
    from hvdkit.doctor.hosts import ssh_argv
    ours = ssh_argv("n1", ["true"], port=2222, key="/k")
    theirs = shlex.split(get_ssh_command("true", "n1", port=2222, identity_file="/k"))
    options = lambda argv: {argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"}
    assert options(theirs) and options(theirs) <= options(ours), (ours, theirs)
    assert "StrictHostKeyChecking=no" in options(ours)
    assert " -p 2222 -i /k n1 true" in " ".join(ours), ours


def test_doctor_hosts_compares_environments():
    from hvdkit.doctor.hosts import problems_of
    ok = {"python": "3.11.7", "horovod": "0.28.1", "build": {"frameworks": "tensorflow,torch", "bytes": 9},
          "torch": "2.1", "tensorflow": "2.16", "interfaces": ["eth0", "lo"]}
    facts = {"a": ok, "b": dict(ok, build={"frameworks": "torch", "bytes": 5}, interfaces=["ens3", "lo"]),
             "c": dict(ok, python="3.10.12", horovod=None), "d": {"error": "No such file or directory", "kind": "python"}}
    found = problems_of(facts, "/venv/bin/python", None)
    assert found[0].startswith("d cannot run /venv/bin/python (No such file or directory); fix: install"), found
    assert not any("same hostname" in p for p in found), found
    assert any(p.startswith("b has Horovod's build frameworks=torch,bytes=5, a has frameworks=tensorflow,torch")
               for p in found), found
    assert any(p.startswith("c has Python 3.10.12, a has 3.11.7") for p in found), found
    assert any(p.startswith("c has no Horovod for /venv/bin/python; fix: install Horovod") for p in found), found
    assert found[-1].startswith("no interface name is on every host (a: eth0, lo; b: ens3, lo; c: eth0, lo)"), found
    assert all("; fix: " in p for p in found), found
    named = {h: dict(ok, hostname=name, hvdkit=v) for h, name, v in (("a", "n1", "0.3"), ("b", "n2", "0.3"),
                                                                     ("c", "n1", "0.2"), ("d", "n2", "0.3"))}
    assert problems_of(named, "/py", None) == [
        "a and c answer with the same hostname n1; fix: if they are one machine, list it once; if not, give each its "
        "own hostname (hostnamectl set-hostname NAME): Horovod tells hosts apart by it",
        "b and d answer with the same hostname n2; fix: if they are one machine, list it once; if not, give each its "
        "own hostname (hostnamectl set-hostname NAME): Horovod tells hosts apart by it",
        "c has hvdkit 0.2, a has 0.3; fix: install the same environment on every host (the same path, e.g. a shared "
        "filesystem or one image)"]
