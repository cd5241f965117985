import os
import sys
import uuid

import pytest

# tests/ is not a package; make its helpers importable as `proc`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proc import OWNER_VAR, descendants, reap_leaks  # noqa: E402

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
