"""Chaos: one elastic job survives a random sequence of worker kills, hosts removed and hosts added.

The events come from a seed (printed; HVDKIT_CHAOS_SEED=<seed> replays the same choices: which event, which host,
which worker by its place among the live ones; pids and timings differ). After each event the test waits
until training has moved on by a few steps, so every event lands on a job that recovered from the one before.
At the end: exit 0, the audit proves every sample of every epoch trained exactly once across all the worlds the
job went through, and the accuracy bar holds. HVDKIT_CHAOS_EVENTS (default 5) sets how many events; a soak,
e.g. HVDKIT_CHAOS_SOAK=1 (40 events, a longer job), runs longer sequences.
"""
import json
import os
import random
import signal
import time

from hvdkit.audit import check
from proc import _cmdline, marked_processes

TRAIN_SAMPLES = 1437
SOAK = os.environ.get("HVDKIT_CHAOS_SOAK") == "1"
EVENTS = int(os.environ.get("HVDKIT_CHAOS_EVENTS", "40" if SOAK else "5"))
EPOCHS = 40 if SOAK else 10
STEP_SLEEP = "0.1"   # a digits step takes ~2 ms; slowed down until the last event, the job outlasts its events
HOSTS = ("localhost", "127.0.0.1")   # two hosts to Horovod on one machine
MAX_SLOTS, MAX_NP = 2, 3


def workers(job):
    """(pid, host) of this job's live training processes."""
    return [(pid, env["HOROVOD_HOSTNAME"]) for pid, env in marked_processes(job.tmp)
            if "HOROVOD_RANK" in env and "gated.py" in _cmdline(pid)]


def choose(rng, slots, live):
    """One event that keeps the job able to go on: (kind, detail, the hosts file's slots after it).

    A kill is a host failing: its worker is SIGKILLed and the host leaves the hosts file (Horovod blacklists it
    for a cooldown anyway); a later "add" brings it back, as a repaired or replacement machine.
    """
    live = [(pid, host) for pid, host in live if host in slots]   # not a worker still leaving a removed host
    live_hosts = {host for _, host in live}
    options = []
    if len(live_hosts) >= 2:                   # another host must keep the state
        options += ["kill", "kill"]            # the event that matters most: twice as likely
    # Removing every host that has workers would leave no one holding the state (Horovod stops the job:
    # "No hosts from previous set remaining"): a whole-job restart from a durable commit, not an elastic event.
    removable = sorted(h for h in slots if len(live_hosts) >= 2 and h in live_hosts)
    if removable:
        options.append("remove")
    if sum(slots.values()) < MAX_NP and (len(slots) < 2 or any(n < MAX_SLOTS for n in slots.values())):
        options.append("add")
    kind = rng.choice(options)
    slots = dict(slots)
    if kind == "kill":
        pid, host = rng.choice(sorted(live, key=lambda w: (w[1], w[0])))   # by host first: replays pick alike
        del slots[host]
        return kind, (pid, host), slots
    if kind == "remove":
        host = rng.choice(removable)
        del slots[host]
        return kind, host, slots
    host = rng.choice(sorted(h for h in HOSTS if slots.get(h, 0) < MAX_SLOTS))
    slots[host] = slots.get(host, 0) + 1
    return kind, host, slots


def as_lines(slots):
    return [f"{host}:{n}" for host, n in sorted(slots.items())]


def test_chaos_elastic_job_survives_random_kills_and_resizes(elastic_job, tmp_path):
    seed = int(os.environ.get("HVDKIT_CHAOS_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"chaos seed {seed} (replay: HVDKIT_CHAOS_SEED={seed}), {EVENTS} events")
    rng = random.Random(seed)
    slots = {"localhost": 1, "127.0.0.1": 1}
    started = time.time()
    fast = os.path.join(str(tmp_path), "events-done")
    job = elastic_job("torch", as_lines(slots), 2, max_np=MAX_NP, cooldown=(1, 4),
                      extra=["--epochs", str(EPOCHS), "--batch-size", "16", "--commit-every", "5"],
                      env={"HVDKIT_STEP_SLEEP": STEP_SLEEP, "HVDKIT_STEP_SLEEP_UNTIL": fast}, timeout=60)
    job.wait_for(lambda: job.max_step() >= 5, "the first steps", 180)
    done = []
    for number in range(EVENTS):
        live, resets = workers(job), len(job.resets())
        kind, detail, slots = choose(rng, slots, live)
        if kind == "kill":
            os.kill(detail[0], signal.SIGKILL)
        job.set_hosts(as_lines(slots))
        done.append(f"{kind} {detail}")
        print(f"event {number + 1}: {kind} {detail} at step {job.max_step()}, hosts now {as_lines(slots)}", flush=True)
        what = f"after event {number + 1} ({kind} {detail}; seed {seed})"
        # the job reshaped (rank 0 logged the reset), then trained a few steps in its new world
        job.wait_for(lambda: len(job.resets()) > resets, f"the reset {what}", 240)
        mark = job.max_step()
        job.wait_for(lambda: job.max_step() >= mark + 3, f"training to go on {what}", 240)
    open(fast, "w").close()   # no more slow steps: the job trains its remaining epochs at full speed
    code = job.finish(timeout=600)
    wall = time.time() - started
    print(f"chaos: {len(done)} events in {wall:.0f} s: {'; '.join(done)}")
    assert code == 0, f"seed {seed}\n" + job.output()[-5000:]
    report = check(job.audit_dir, TRAIN_SAMPLES, EPOCHS)
    assert report["ok"], (seed, report["problems"])
    with open(job.metrics) as f:
        metrics = json.load(f)
    print(f"chaos: test accuracy {metrics['test_accuracy']:.4f}, {len(job.resets())} resets")
    assert metrics["epochs"] == EPOCHS and metrics["test_accuracy"] >= 0.95, (seed, metrics)
    assert len(job.resets()) >= EVENTS, (seed, job.resets())   # every event reshaped the job
