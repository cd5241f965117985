"""A rank stuck outside the collectives: Horovod's stall check with hvdkit's defaults, and elastic retries bounded.

In process: the defaults (warn after 60 s, shut down after 600 s) are set before ``hvd.init()`` unless the user
set them, and an elastic job that keeps restarting from the same commit stops instead of retrying forever.
Launched (tests/workers/stall.py, 2 torch workers): rank 1 sleeps outside any collective; with small overrides
Horovod names it in its warning, then shuts down and the job ends non-zero long before the sleep would have.

Horovod 0.28.1's stall check, as shipped, works only under the MPI controller (``mpirun``): its Gloo controller
(``horovodrun --gloo``: every elastic job, and static ones with ``--controller gloo``) fills its rank list with ``reserve`` instead of ``resize``, so the list
stays empty and no rank is ever reported missing (gloo_controller.cc). mpi/patch_horovod.py fixes it in our build;
the horovodrun-gloo case below fails without that fix.
"""
import json
import os
import time

import pytest

from hvdkit import HvdkitError, TrainConfig, Trainer
from hvdkit.callbacks import Callback
from hvdkit.process import apply_stall_defaults
from proc import explain, launch

WARN, SHUT = "HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"


# ---- the defaults --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ({}, {WARN: "60", SHUT: "600"}),
    ({WARN: "5"}, {WARN: "5", SHUT: "600"}),                              # the user's value wins
    ({SHUT: "0"}, {WARN: "60", SHUT: "0"}),                               # 0: never shut down, as asked
    ({WARN: "900"}, {WARN: "900", SHUT: "1800"}),                         # above 600 s: Horovod needs shut > warn
    ({WARN: "30", SHUT: "45"}, {WARN: "30", SHUT: "45"}),
    ({"HOROVOD_STALL_CHECK_DISABLE": "1"}, {"HOROVOD_STALL_CHECK_DISABLE": "1"}),   # --no-stall-check
])
def test_stall_defaults_apply_only_where_the_user_set_nothing(given, expected):
    env = dict(given)
    apply_stall_defaults(env)
    assert env == expected


def test_horovod_process_init_applies_them_before_horovod_starts(monkeypatch):
    torch_hvd = pytest.importorskip("horovod.torch")
    from hvdkit.torch.process import HorovodProcess
    seen = {}
    monkeypatch.delenv(WARN, raising=False)
    monkeypatch.setenv(SHUT, "42")
    monkeypatch.setattr(torch_hvd, "init", lambda *a, **k: seen.update({k: os.environ.get(k) for k in (WARN, SHUT)}))
    HorovodProcess().init(seed=0, threads=1)
    assert seen == {WARN: "60", SHUT: "42"}


# ---- elastic: no endless retries from one commit -------------------------------------------------------------

class FailAt(Callback):
    """Raise ``error`` every time step ``at`` ends, as a rank that stalls at the same place every time would."""
    all_ranks = True

    def __init__(self, at, error, times=None):
        self.at, self.error, self.times, self.fired = at, error, times, 0

    def on_step_end(self, trainer, global_step, loss):
        if global_step == self.at and (self.times is None or self.fired < self.times):
            self.fired += 1
            raise self.error


def local_fit(callback, **config):
    torch = pytest.importorskip("torch")
    from hvdkit.torch import LocalProcess, TorchAdapter
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    model = torch.nn.Linear(4, 2)
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy)
    cfg = TrainConfig(**dict(dict(epochs=1, batch_size=4, progress_bar=False, elastic=True, commit_every=3), **config))
    return Trainer(adapter, cfg, callbacks=[callback], process=LocalProcess()).fit((x.numpy(), y.numpy()))


def test_an_elastic_job_failing_at_the_same_place_stops_after_three_restarts():
    from horovod.common.exceptions import HorovodInternalError
    stall = FailAt(5, HorovodInternalError("Horovod has been shut down (simulated stall)"))
    with pytest.raises(HvdkitError, match=r"^the elastic job restarted 3 times in a row from the same commit "):
        local_fit(stall)
    assert stall.fired == 4   # the first try, then 3 restarts from the commit at step 3; no fourth restart


def test_restarts_with_progress_in_between_are_not_counted():
    from horovod.common.exceptions import HorovodInternalError
    flaky = FailAt(5, HorovodInternalError("peer lost (simulated)"), times=2)   # recovers on the third try
    result = local_fit(flaky)
    assert flaky.fired == 2 and result.global_step == 10 and result.resets == 2


# ---- a real stall: 2 workers, rank 1 asleep outside the collectives -------------------------------------------

SLEEP = 60   # rank 1's nap; the job must end long before it


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])   # static horovodrun: MPI, as mpirun
def test_a_rank_asleep_outside_the_collectives_is_named_and_the_job_stops(tmp_path, launcher):
    started = time.monotonic()
    result = launch("tests/workers/stall.py", [str(tmp_path), str(SLEEP)], np=2, launcher=launcher, timeout=120,
                    env={WARN: "2", SHUT: "6"})
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert "Missing ranks:" in output, explain(result)
    assert "1: [allreduce." in output                        # the warning names rank 1 and its pending tensors
    assert "is stalled for longer than 6 seconds. Will shutdown." in output
    assert result.returncode != 0 and elapsed < SLEEP - 10, explain(result)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["outcome"] != "trained" and rank0["seconds"] < SLEEP - 20
    assert (rank0[WARN], rank0[SHUT]) == ("2", "6")          # the user's values, not hvdkit's defaults
