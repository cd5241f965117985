import os
import re
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

# tests/ is not a package; make its helpers importable as `proc`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proc import OWNER_VAR, REPO, WORKERS, descendants, explain, launch, reap_leaks  # noqa: E402

LEAK_GRACE = 5.0   # seconds a test's processes get to finish exiting on their own after it


@pytest.fixture(autouse=True)
def no_leaked_processes(request):
    """Fail any test that leaves processes of its own behind, and kill them.

    Every process the test starts inherits ``HVDKIT_TEST_OWNER=<uuid>:<test id>`` (horovodrun and mpirun
    pass their environment to local workers), so leftovers are found even in sessions of their own;
    children forked without exec are found as new descendants of pytest. Those still alive
    ``LEAK_GRACE`` s after the test's other fixtures are torn down are SIGKILLed and the test errors
    at teardown, naming them.
    """
    owner = f"{uuid.uuid4().hex}:{request.node.nodeid}"
    baseline = descendants()
    saved = os.environ.get(OWNER_VAR)
    os.environ[OWNER_VAR] = owner
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(OWNER_VAR, None)
        else:
            os.environ[OWNER_VAR] = saved
    leaked = reap_leaks(owner, baseline, grace=LEAK_GRACE)
    if leaked:
        listing = "\n".join(f"  pid {pid}: {cmd[:300]}" for pid, cmd in sorted(leaked.items()))
        pytest.fail(f"the test left {len(leaked)} process(es) running {LEAK_GRACE:g} s after it ended "
                    f"(now killed):\n{listing}", pytrace=False)


@pytest.fixture
def elastic_job(tmp_path):
    """Factory of :class:`elastic_harness.ElasticJob` in ``tmp_path``; every job it made is killed at
    teardown (launcher group and marked workers), whether the test passed or not."""
    from elastic_harness import ElasticJob
    jobs = []

    def start(framework, hosts, np, **kw):
        job = ElasticJob(str(tmp_path), framework, hosts, np, **kw)
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        job.kill()


# ---- launches shared between tests and files --------------------------------------------------------------------
# A launch costs more than most of what it checks (a Keras worker spends 15-25 s starting, a torch one 5-10 s), so
# scripts that need the same kind of job run one after the other in ONE launch of tests/workers/runs.py. A test
# module declares its runs in a module-level dict
#
#     SHARED_RUNS = {"contract-torch-mpirun": dict(framework="torch", launcher="mpirun", np=2, order=10,
#                                                  script="tests/workers/contract_checks.py", args=["torch", "{out}"],
#                                                  timeout=300)}
#
# ("{out}" in args: a directory of the run's own) and reads one with ``shared_runs.get(name)``. The first get of a
# (framework, launcher, np) group launches every run of that group declared by the collected modules, in
# ``order`` (then declaration order), with the sum of their timeouts; one framework per interpreter. A run whose
# ranks did not all finish fails its tests with the launch's output; the runs before it still count.
# ``launch="NAME"`` in a spec puts the run in a launch of its own, (framework, launcher, np, NAME): a module whose
# runs all have one keeps its tests in its own lane (below), off the shared lane, for one more interpreter start.
RUNS_WORKER = os.path.join(WORKERS, "runs.py")
_SHARED_RUNS = {}   # name -> spec, from the collected modules' SHARED_RUNS
_DECLARED_IN = {}   # name -> the module declaring it
_OWN_LAUNCHES = set()   # the modules whose runs all have launch= (their tests stay in their own lane)
_CURRENT = []       # the test being set up or run (for the lane check in SharedRuns.get)
_LAUNCHED = []      # (group, seconds, [(run name, its seconds on rank 0 or None)]) for the terminal summary


@pytest.hookimpl(tryfirst=True)   # before xdist's own, which reads the xdist_group marks set here
def pytest_collection_modifyitems(session, config, items):
    seen, own_groups = set(), {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        runs = getattr(module, "SHARED_RUNS", {})
        own = {"launch" in spec for spec in runs.values()}
        assert len(own) <= 1, f"{module.__name__} mixes launches of its own (launch=) and shared ones; pick one"
        if own == {True}:
            _OWN_LAUNCHES.add(module.__name__)
        for name, spec in runs.items():
            assert re.fullmatch(r"[\w-]+", spec.get("launch", "x")), f"{name}: launch= takes letters, digits, _, -"
            assert _SHARED_RUNS.get(name, spec) == spec, f"two modules declare different shared runs {name!r}"
            _SHARED_RUNS[name] = spec
            _DECLARED_IN.setdefault(name, module.__name__)
            if "launch" in spec:   # a launch of its own runs in its module's lane: two modules' would launch it twice
                group = SharedRuns._group(spec)
                owner = own_groups.setdefault(group, module.__name__)
                if owner != module.__name__:
                    raise pytest.UsageError(f"{module.__name__}: {name}: launch={spec['launch']!r} ({group[0]}, "
                                            f"{group[1]}, -np {group[2]}) is also a launch of {owner}; give one of "
                                            "the two modules' launches another launch= name")
    if hasattr(config, "workerinput"):   # a pytest-xdist worker (the README's `-n 2 --dist loadgroup`)
        items[:] = _in_lanes(items)


# ---- two lanes (pytest-xdist) ------------------------------------------------------------------------------------
# Much of the suite is waiting: on Horovod's background cycle, on a Gloo timeout (the multi-host cut-off waits 60 s),
# on elastic gates and discovery intervals, on a Keras worker's 15-25 s start. Run as `pytest -n 2 --dist loadgroup`,
# two workers each take whole groups of tests: a module is one group (its module-scoped fixtures, netns hosts or a
# launch, are made once), and every test reading a shared launch (SHARED_RUNS) is in one group (else both workers
# would launch it). Heaviest groups first, so the last one to start is a small one.
HEAVY_FIRST = ["test_elastic", "test_multihost", "test_zero_keras", "test_rank_failure", "test_chaos",
               "test_zero_elastic", "test_bench_smoke", "test_job_end", "test_launch", "test_stream_resize",
               "test_peer_lost", "test_stall", "test_zero_torch", "test_tfdata_robust", "test_keras_threads"]
SHARED_LANE = "shared-launches"


def _lane_of_run(name):
    """A launch of its own (``launch=``) is read in its module's lane, every other shared run in the shared lane."""
    return _DECLARED_IN[name] if "launch" in _SHARED_RUNS[name] else SHARED_LANE


def _in_lanes(items):
    """``items`` marked with their xdist group and ordered: the shared launches, the heavy modules, the rest."""
    # Every test reading a shared launch in one lane: the launch groups chain the modules (contract + zoo share
    # torch/horovodrun, zoo + tfdata share tensorflow/horovodrun, ...), so a lane per chain would not be smaller.
    # Those modules' other tests (in-process ones, launches of their own) go to their module's lane, and so do the
    # tests of a module whose runs are all launches of its own. A test must name `shared_runs` in its fixtures'
    # closure to be placed here (a getfixturevalue is not seen): SharedRuns.get fails one that does not.
    rank = {SHARED_LANE: -1, **{name: i for i, name in enumerate(HEAVY_FIRST)}}
    lanes = {}
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__ if module is not None else item.nodeid.split("::")[0]
        shared = "shared_runs" in getattr(item, "fixturenames", ()) and name not in _OWN_LAUNCHES
        lane = SHARED_LANE if shared else name
        item.add_marker(pytest.mark.xdist_group(lane))
        lanes.setdefault(lane, []).append(item)
    order = sorted(lanes, key=lambda lane: rank.get(lane, len(rank)))   # stable: collection order after those
    return [item for lane in order for item in lanes[lane]]


def pytest_configure(config):
    """Under pytest-xdist, only ``--dist loadgroup`` keeps a group on one worker (other modes would split the multi-host
    module's netns hosts and the shared launches over both), and only with a pytest whose node ids xdist can tag."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if config.getoption("dist") != "loadgroup":
        raise pytest.UsageError(f"--dist {config.getoption('dist')} would split this suite's groups over the workers; "
                                "add --dist loadgroup --no-loadscope-reorder (the README's command)")
    if pytest.version_tuple[:2] >= (9, 2):
        raise pytest.UsageError(f"pytest {pytest.__version__} renamed the node id xdist's --dist loadgroup tags, so "
                                "its groups would be ignored; install the test extras' pytest (pip install 'pytest>=8,<9')")


class SharedRuns:
    def __init__(self, tmp_path_factory):
        self.tmp_path_factory, self.groups = tmp_path_factory, {}

    @staticmethod
    def _group(spec):
        return spec["framework"], spec["launcher"], spec["np"], spec.get("launch")

    def _launch(self, group):
        framework, launcher, np_, own = group
        names = [n for n, spec in _SHARED_RUNS.items() if self._group(spec) == group]
        names.sort(key=lambda n: _SHARED_RUNS[n].get("order", 50))   # stable: declaration order within an order
        root = self.tmp_path_factory.mktemp(f"shared-{framework}-{launcher}-np{np_}" + (f"-{own}" if own else ""))
        args, index = [str(root / "records")], {}
        for i, name in enumerate(names):
            spec, out = _SHARED_RUNS[name], root / name
            out.mkdir()
            if i:
                args.append("+++")
            args.append(os.path.join(REPO, spec["script"]))   # a .py first: runs.py runs that script
            args += [a.replace("{out}", str(out)) for a in spec["args"]]
            index[name] = i
        env = {"HVDKIT_RUNS_IMPORT": "hvdkit.keras"} if framework == "tensorflow" else None
        started = time.monotonic()
        try:
            result, error = launch(RUNS_WORKER, args, np=np_, launcher=launcher, env=env,
                                   timeout=sum(_SHARED_RUNS[n]["timeout"] for n in names)), None
        except AssertionError as e:   # timed out: every run of the group fails with it, none is relaunched
            result, error = None, str(e)
        done = [root / "records" / f"done{index[n]}-rank0" for n in names]
        _LAUNCHED.append((group, time.monotonic() - started,
                          [(n, float(d.read_text() or 0) if d.exists() else None) for n, d in zip(names, done)]))
        return SimpleNamespace(root=root, index=index, result=result, error=error)

    def get(self, name):
        """The run ``name`` once its shared launch ended: ``out`` (its directory), ``records`` (runs.py's
        per-rank FitResults of its Trainer.fit calls, or [] when none), ``seconds`` (rank 0's time in it),
        ``result`` (the launch's CompletedProcess: rc, stdout, stderr of every run of the group)."""
        assert name in _SHARED_RUNS, f"no collected module declares the shared run {name!r}"
        spec = _SHARED_RUNS[name]
        group = self._group(spec)
        lane = _CURRENT[0].get_closest_marker("xdist_group") if _CURRENT else None
        if lane is not None and lane.args[0] != _lane_of_run(name):   # else this lane would launch it a second time
            pytest.fail(f"{_CURRENT[0].nodeid} reads the shared run {name!r} but runs in the lane {lane.args[0]!r}, "
                        f"not {_lane_of_run(name)!r}; name the fixture that reads it in the test's signature "
                        "(not through request.getfixturevalue)", pytrace=False)
        if group not in self.groups:
            self.groups[group] = self._launch(group)
        launched = self.groups[group]
        if launched.error:
            pytest.fail(f"the shared launch of {name} failed: {launched.error}", pytrace=False)
        i, records_dir = launched.index[name], launched.root / "records"
        if not all((records_dir / f"done{i}-rank{r}").exists() for r in range(spec["np"])):
            pytest.fail(f"run {name} (#{i} of its shared launch) did not finish on every rank:\n"
                        + explain(launched.result), pytrace=False)
        records = [records_dir / f"run{i}-rank{r}.json" for r in range(spec["np"])]
        seconds = float((records_dir / f"done{i}-rank0").read_text() or 0)
        return SimpleNamespace(out=launched.root / name, result=launched.result, index=i, seconds=seconds,
                               records=[Path(p) for p in records if p.exists()])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT[:] = [item]


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Runs declared in the modules' SHARED_RUNS, one launch per (framework, launcher, np, own launch) group."""
    return SharedRuns(tmp_path_factory)


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:   # an xdist worker: its launches go to the controller's summary
        workeroutput["shared_launches"] = [[list(group), seconds, runs] for group, seconds, runs in _LAUNCHED]


@pytest.hookimpl(optionalhook=True)   # an xdist hook: pytest without xdist must not reject it
def pytest_testnodedown(node, error):
    """xdist controller: a worker's shared launches, for the summary."""
    for group, seconds, runs in getattr(node, "workeroutput", {}).get("shared_launches", []):
        _LAUNCHED.append((tuple(group), seconds, [tuple(run) for run in runs]))


def pytest_terminal_summary(terminalreporter):
    """One line per shared launch: its wall time and each run's seconds (rank 0), to see where a launch goes."""
    for (framework, launcher, np_, own), seconds, runs in _LAUNCHED:
        shown = ", ".join(f"{name} {'-' if t is None else f'{t:.0f}'}" for name, t in runs)
        terminalreporter.write_line(f"shared launch {framework} {launcher} -np {np_}{f' ({own})' if own else ''}: "
                                    f"{seconds:.0f} s ({shown})")
