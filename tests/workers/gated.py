"""Worker: run an example script with a test gate at one global step (argv: SCRIPT [ARGS...]).

With HVDKIT_GATE_DIR and HVDKIT_GATE_STEP set, every rank's Trainer gets one more callback: when a step
ends with ``global_step == HVDKIT_GATE_STEP`` it writes ``reached-<HOROVOD_HOSTNAME>-<pid>`` to the gate
dir and blocks until the test creates ``release`` there. So the test acts (kills a worker, edits the
hosts file, kills the job) at a known step instead of whenever its polling noticed progress. The gate
blocks once: not again in the same process, and never once ``release`` exists (after a rollback the
step is reached again). The step's callback runs before the trainer's commit of that step, so a
gate on a multiple of --commit-every holds the workers just before that commit.

``HVDKIT_GATE_STEP`` may list several steps (``28,57``): one job then stops at each in turn; each gate has a
directory of its own, ``<gate dir>/step<N>``, holding its ``reached-*`` files and its ``release``.

While a process waits at the gate it also reports host-set changes Horovod's driver notifies it of
(only the coordinator, rank 0, is notified): ``hosts-updated-<pid>-<n>`` appears in the gate dir, so a
test can release the gate knowing the resize happens at the very next commit.
HVDKIT_LR_LOG=DIR records the LR every optimizer step applied (tests/workers/lr_checks.py).
HVDKIT_STEP_SLEEP=seconds makes every step that much longer (until the file HVDKIT_STEP_SLEEP_UNTIL exists).
HVDKIT_GATE_AT moves the gate: ``end`` holds every rank in on_train_end (before rank 0's final side effects,
e.g. the metrics file), ``exit`` after the script returned (its outputs written), just before the process exits.
Without the variables the script runs unchanged.

HVDKIT_FAULT=``where:rank[:step]`` makes the worker that is rank ``rank`` raise a RuntimeError once (an ordinary
bug, not a lost peer): ``begin`` in on_train_begin, ``step`` in on_step_end at global step ``step``, ``data``
when the feed fetches its ``step``-th batch, ``end`` in on_train_end (before rank 0's final side effects).
"""
import os
import runpy
import sys
import time

GATE_DIR = os.environ.get("HVDKIT_GATE_DIR")
GATE_STEP = os.environ.get("HVDKIT_GATE_STEP")
GATE_AT = os.environ.get("HVDKIT_GATE_AT", "step")
GIVE_UP_AFTER = float(os.environ.get("HVDKIT_GATE_TIMEOUT", "120"))


def _touch(name: str, directory: str = None) -> None:
    path = os.path.join(directory or GATE_DIR, name)
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(path + ".tmp", path)


class _HostsListener:
    """Registered with Horovod's worker notification manager; notes host-set changes in the gate dir."""

    def __init__(self):
        self.count = 0

    def on_hosts_updated(self, timestamp, update_res):
        self.count += 1
        _touch(f"hosts-updated-{os.getpid()}-{self.count}")


def gate_steps() -> list:
    return [int(s) for s in (GATE_STEP or "0").split(",")]


def gate_dir(step: int) -> str:
    """Where the gate of ``step`` keeps its files: the gate dir itself when there is one gate."""
    return GATE_DIR if len(gate_steps()) == 1 else os.path.join(GATE_DIR, f"step{step}")


def wait_for_release(where: str, directory: str = None) -> None:
    """Say this worker is at the gate, then block until the test releases it (or gives up)."""
    directory = directory or GATE_DIR
    release = os.path.join(directory, "release")
    _touch(f"reached-{os.environ.get('HOROVOD_HOSTNAME', 'localhost')}-{os.getpid()}", directory)
    deadline = time.time() + GIVE_UP_AFTER
    while not os.path.exists(release):
        if time.time() > deadline:
            print(f"gated.py: no release after {GIVE_UP_AFTER:.0f}s at {where}; going on", file=sys.stderr, flush=True)
            return
        time.sleep(0.05)


def install_gate() -> None:
    from hvdkit.callbacks import Callback
    from hvdkit.trainer import Trainer

    steps = gate_steps()
    for step in steps:
        os.makedirs(gate_dir(step), exist_ok=True)

    class Gate(Callback):
        all_ranks = True

        def __init__(self):
            self.done = set()   # the gates (steps; 0 for end/exit) this process has held at
            self.listening = False

        def _listen(self):
            self.listening = True
            try:
                from horovod.common.elastic import notification_manager
            except ImportError:
                return
            notification_manager.register_listener(_HostsListener())

        def on_step_end(self, trainer, global_step, loss):
            if not self.listening and os.environ.get("HOROVOD_ELASTIC") == "1":
                self._listen()  # inside Horovod's elastic loop by now: the manager is initialised
            if GATE_AT == "step" and global_step in steps:
                self.hold(f"step {global_step}", global_step)

        def on_train_end(self, trainer, result):
            if GATE_AT == "end" and not self.done:
                _touch(f"rank{trainer.process.rank}-{os.getpid()}")  # which worker is rank 0 now
                self.hold("on_train_end", 0)

        def hold(self, where: str, step: int) -> None:
            directory = gate_dir(step)
            if step in self.done or os.path.exists(os.path.join(directory, "release")):
                return
            self.done.add(step)
            wait_for_release(where, directory)

    original = Trainer.__init__

    def __init__(self, adapter, config=None, callbacks=(), **kw):
        original(self, adapter, config, [Gate()] + list(callbacks), **kw)  # first: before MetricsFile

    Trainer.__init__ = __init__


def install_fault(spec: str) -> None:
    from hvdkit.callbacks import Callback
    from hvdkit.feed import IndexedFeed
    from hvdkit.trainer import Trainer

    where, rank, *step = spec.split(":")
    rank, step = int(rank), int(step[0]) if step else 0
    fired = []

    def fire(current_rank: int, what: str) -> None:
        if current_rank == rank and not fired:
            fired.append(what)
            print(f"gated.py: injecting a fault on rank {rank}: {what}", file=sys.stderr, flush=True)
            raise RuntimeError(f"injected fault in {what} at unix time {time.time():.3f}")

    class Fault(Callback):
        all_ranks = True

        def on_train_begin(self, trainer):
            if where == "begin":
                fire(trainer.process.rank, "on_train_begin")

        def on_step_end(self, trainer, global_step, loss):
            if where == "step" and global_step == step:
                fire(trainer.process.rank, f"on_step_end at step {step}")

        def on_train_end(self, trainer, result):
            if where == "end":
                fire(trainer.process.rank, "on_train_end")

    if where == "data":  # every framework's indexed feed fetches through its instance's ``fetch``
        feed_init, calls = IndexedFeed.__init__, []

        def init_with_failing_fetch(self, n):
            feed_init(self, n)
            fetch = self.fetch

            def failing_fetch(ids):
                calls.append(1)
                if len(calls) == step:
                    fire(int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))),
                         f"data loading (batch {step})")
                return fetch(ids)
            self.fetch = failing_fetch
        IndexedFeed.__init__ = init_with_failing_fetch
    original = Trainer.__init__

    def __init__(self, adapter, config=None, callbacks=(), **kw):
        original(self, adapter, config, [Fault()] + list(callbacks), **kw)
    Trainer.__init__ = __init__


def install_throttle(seconds: float) -> None:
    """Every step lasts ``seconds`` longer until the file HVDKIT_STEP_SLEEP_UNTIL exists (a chaos test needs a job
    that outlasts its events, and then finishes quickly)."""
    until = os.environ.get("HVDKIT_STEP_SLEEP_UNTIL")
    from hvdkit.callbacks import Callback
    from hvdkit.trainer import Trainer

    class Throttle(Callback):
        all_ranks = True

        def on_step_end(self, trainer, global_step, loss):
            if not (until and os.path.exists(until)):
                time.sleep(seconds)

    original = Trainer.__init__

    def __init__(self, adapter, config=None, callbacks=(), **kw):
        original(self, adapter, config, list(callbacks) + [Throttle()], **kw)
    Trainer.__init__ = __init__


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: gated.py SCRIPT [ARGS...]")
    script = os.path.abspath(sys.argv[1])
    if GATE_DIR and (GATE_STEP or GATE_AT != "step"):
        os.makedirs(GATE_DIR, exist_ok=True)
        install_gate()
    if os.environ.get("HVDKIT_LR_LOG"):   # record the LR each optimizer step applied (tests/workers/lr_checks.py)
        import lr_checks   # tests/workers is sys.path[0] here
        lr_checks.install(os.environ["HVDKIT_LR_LOG"])
    if os.environ.get("HVDKIT_STEP_SLEEP"):
        install_throttle(float(os.environ["HVDKIT_STEP_SLEEP"]))
    if os.environ.get("HVDKIT_FAULT"):
        install_fault(os.environ["HVDKIT_FAULT"])
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)   # as if the script had been started directly
    runpy.run_path(script, run_name="__main__")
    if GATE_DIR and GATE_AT == "exit":  # the script is done (outputs written): hold before the process exits
        wait_for_release("exit")
