"""The exactly-once checker: completed steps, rollbacks and restarts, and what it must catch."""
import json

from hvdkit.audit import AuditLog, check


def epoch_of(log, world, steps, per_step, first_step=1, epoch=0):
    """Record `steps` steps that together cover ids 0..steps*per_step-1, split over `world` ranks."""
    for s in range(steps):
        ids = list(range(s * per_step, (s + 1) * per_step))
        for r in range(world):
            log.record(epoch, first_step + s, r, world, ids[r::world])


def test_complete_epoch_is_exactly_once(tmp_path):
    log = AuditLog(str(tmp_path))
    log.start(0, 0, 2)
    epoch_of(log, 2, 5, 4)
    report = check(str(tmp_path), samples=20, epochs=1)
    assert report["ok"] and report["records"] == 10 and report["dropped"] == 0


def test_rollback_drops_the_undone_steps(tmp_path):
    log = AuditLog(str(tmp_path))
    log.start(0, 0, 2)
    epoch_of(log, 2, 3, 4)                 # steps 1-3 on two workers
    log.rolled_back(2)                     # a worker died: back to the commit at step 2
    log.record(0, 3, 0, 1, range(8, 12))   # step 3 again, on the survivor, and the rest
    log.record(0, 4, 0, 1, range(12, 16))
    report = check(str(tmp_path), samples=16, epochs=1)
    assert report["ok"], report["problems"]
    assert report["dropped"] == 2 and report["rollbacks"] == 1


def test_without_the_marker_the_retrained_step_is_a_duplicate(tmp_path):
    log = AuditLog(str(tmp_path))
    log.start(0, 0, 2)
    epoch_of(log, 2, 3, 4)
    log.record(0, 3, 0, 1, range(8, 12))
    report = check(str(tmp_path), samples=12, epochs=1)
    assert not report["ok"] and "4 trained more than once" in report["problems"][0]


def test_a_restarted_job_undoes_steps_after_its_durable_commit(tmp_path):
    first = AuditLog(str(tmp_path))
    first.start(0, 0, 2)
    epoch_of(first, 2, 4, 4)               # steps 1-4, then the whole job is killed
    second = AuditLog(str(tmp_path))
    second.path = str(tmp_path / "audit-restart-1.jsonl")   # another process writes its own file
    second.start(2, 0, 1)                  # newest good durable commit: step 2
    second.record(0, 3, 0, 1, range(8, 12))
    second.record(0, 4, 0, 1, range(12, 16))
    report = check(str(tmp_path), samples=16, epochs=1)
    assert report["ok"], report["problems"]
    assert report["processes"] == 2 and report["dropped"] == 4


def test_missing_samples_are_reported(tmp_path):
    log = AuditLog(str(tmp_path))
    log.start(0, 0, 1)
    log.record(0, 1, 0, 1, [0, 1, 2])
    report = check(str(tmp_path), samples=5, epochs=2)
    assert not report["ok"]
    assert report["problems"][0].startswith("epoch 0: 2 samples never trained")
    assert report["problems"][1].startswith("epoch 1: 5 samples never trained")
    lines = [json.loads(l) for l in open(log.path)]
    assert [l["kind"] for l in lines] == ["start", "step"]


def test_a_slower_peer_starting_does_not_undo_a_live_peer(tmp_path):
    fast = AuditLog(str(tmp_path))
    fast.start(0, 0, 2)
    fast.record(0, 1, 0, 2, [0, 1])        # step 1 recorded before the peer's start line...
    slow = AuditLog(str(tmp_path))
    slow.path = str(tmp_path / "audit-peer-2.jsonl")
    slow.start(0, 1, 2)
    slow.record(0, 1, 1, 2, [2, 3])
    fast.record(0, 2, 0, 2, [4])           # ...and the fast peer lives on
    slow.record(0, 2, 1, 2, [5])
    report = check(str(tmp_path), samples=6, epochs=1)
    assert report["ok"], report["problems"]
    assert report["dropped"] == 0
