import os
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
RUNS_WORKER = os.path.join(WORKERS, "runs.py")
_SHARED_RUNS = {}   # name -> spec, from the collected modules' SHARED_RUNS
_LAUNCHED = []      # (group, seconds, [(run name, its seconds on rank 0 or None)]) for the terminal summary


def pytest_collection_modifyitems(session, config, items):
    seen = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        for name, spec in getattr(module, "SHARED_RUNS", {}).items():
            assert _SHARED_RUNS.get(name, spec) == spec, f"two modules declare different shared runs {name!r}"
            _SHARED_RUNS[name] = spec


class SharedRuns:
    def __init__(self, tmp_path_factory):
        self.tmp_path_factory, self.groups = tmp_path_factory, {}

    @staticmethod
    def _group(spec):
        return spec["framework"], spec["launcher"], spec["np"]

    def _launch(self, group):
        framework, launcher, np_ = group
        names = [n for n, spec in _SHARED_RUNS.items() if self._group(spec) == group]
        names.sort(key=lambda n: _SHARED_RUNS[n].get("order", 50))   # stable: declaration order within an order
        root = self.tmp_path_factory.mktemp(f"shared-{framework}-{launcher}-np{np_}")
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


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Runs declared in the modules' SHARED_RUNS, one launch per (framework, launcher, np) group."""
    return SharedRuns(tmp_path_factory)


def pytest_terminal_summary(terminalreporter):
    """One line per shared launch: its wall time and each run's seconds (rank 0), to see where a launch goes."""
    for (framework, launcher, np_), seconds, runs in _LAUNCHED:
        shown = ", ".join(f"{name} {'-' if t is None else f'{t:.0f}'}" for name, t in runs)
        terminalreporter.write_line(f"shared launch {framework} {launcher} -np {np_}: {seconds:.0f} s ({shown})")
