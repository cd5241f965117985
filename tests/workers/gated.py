"""Worker: run an example script with a test gate at one global step (argv: SCRIPT [ARGS...]).

With HVDKIT_GATE_DIR and HVDKIT_GATE_STEP set, every rank's Trainer gets one more callback: when a step
ends with ``global_step == HVDKIT_GATE_STEP`` it writes ``reached-<HOROVOD_HOSTNAME>-<pid>`` to the gate
dir and blocks until the test creates ``release`` there. So the test acts (kills a worker, edits the
hosts file, kills the job) at a known step instead of whenever its polling noticed progress. The gate
blocks once: not again in the same process, and never once ``release`` exists (after a rollback the
step is reached again). The step's callback runs before the trainer's commit of that step, so a
gate on a multiple of --commit-every holds the workers just before that commit.

While a process waits at the gate it also reports host-set changes Horovod's driver notifies it of
(only the coordinator, rank 0, is notified): ``hosts-updated-<pid>-<n>`` appears in the gate dir, so a
test can release the gate knowing the resize happens at the very next commit.
Without the variables the script runs unchanged.
"""
import os
import runpy
import sys
import time

GATE_DIR = os.environ.get("HVDKIT_GATE_DIR")
GATE_STEP = os.environ.get("HVDKIT_GATE_STEP")
GIVE_UP_AFTER = float(os.environ.get("HVDKIT_GATE_TIMEOUT", "120"))


def _touch(name: str) -> None:
    path = os.path.join(GATE_DIR, name)
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


def install_gate() -> None:
    from hvdkit.callbacks import Callback
    from hvdkit.trainer import Trainer

    step = int(GATE_STEP)
    release = os.path.join(GATE_DIR, "release")

    class Gate(Callback):
        all_ranks = True

        def __init__(self):
            self.done = False
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
            if self.done or global_step != step or os.path.exists(release):
                return
            self.done = True
            _touch(f"reached-{os.environ.get('HOROVOD_HOSTNAME', 'localhost')}-{os.getpid()}")
            deadline = time.time() + GIVE_UP_AFTER
            while not os.path.exists(release):
                if time.time() > deadline:
                    print(f"gated.py: no release after {GIVE_UP_AFTER:.0f}s at step {step}; going on",
                          file=sys.stderr, flush=True)
                    return
                time.sleep(0.05)

    original = Trainer.__init__

    def __init__(self, adapter, config=None, callbacks=(), **kw):
        original(self, adapter, config, list(callbacks) + [Gate()], **kw)

    Trainer.__init__ = __init__


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: gated.py SCRIPT [ARGS...]")
    script = os.path.abspath(sys.argv[1])
    if GATE_DIR and GATE_STEP:
        os.makedirs(GATE_DIR, exist_ok=True)
        install_gate()
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)   # as if the script had been started directly
    runpy.run_path(script, run_name="__main__")
