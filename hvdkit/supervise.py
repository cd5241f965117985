"""Run a launcher (horovodrun, mpirun) as a child and end a failed job with one line naming the first failing rank.

``hvdkit launch`` uses :func:`supervise`. The launcher runs in a process group of its own; its output (stdout and
stderr merged, so the order is kept) is written whole to a log file and streamed to the terminal, worker lines to
the stream they came from (the launchers tag them ``[1]<stderr>:`` under horovodrun with Gloo, ``[1,1]<stderr>:``
under ``mpirun --tag-output``, which static horovodrun jobs run), except the launcher's own noise about a failure: its Python traceback
(``RuntimeError: Horovod detected that one or more processes exited ...``, elastic thread tracebacks, ``Job has been
shutdown``), horovodrun's ``Process 1 exit with status code 2.`` lines and mpirun's ``Primary job terminated
normally ...`` banner blocks. ``verbose=True`` streams everything as it comes. When the job fails, the last line is::

    hvdkit: error: rank 1 failed first (exit 2): hvdkit: error: batch_size must be >= 1 (got 0); pass e.g. \
--batch-size 32; full output: /tmp/hvdkit-launch-20261127-101500-4242.log

Exit codes of ``hvdkit launch`` (stable, so scripts can branch on them):

* 0 -- every worker succeeded (the default log file is then removed; one chosen with ``--log`` is kept);
* 2 -- bad input: hvdkit refused to start (preflight: missing script or hosts file, launcher not found, ...), or
  the first failing worker itself exited 2, hvdkit's own code for bad input (``hvdkit: error: ...``);
* N -- the first failing worker's own exit code N when it is 1..125 (an uncaught Python exception gives 1,
  ``sys.exit(3)`` 3), the same under horovodrun (which itself exits 1) and mpirun;
* 1 -- any other failure: a worker killed by a signal, or the launcher failing without naming a worker;
* 0 also when workers were killed only after rank 0's trainer logged ``training complete`` (every rank finished
  ``fit`` and the outputs written inside it, e.g. the metrics file, exist): one warning line says so;
* 130 / 143 / 129 -- ``hvdkit launch`` itself got SIGINT (Ctrl-C) / SIGTERM / SIGHUP; the job was stopped.

On SIGINT, SIGTERM or SIGHUP the signal is passed to the launcher's group (horovodrun and mpirun then stop their
workers), and after ``GRACE`` seconds the group is killed; every process left over is killed on the way out
(hvdkit makes itself the child subreaper, so workers a launcher put in sessions of their own are still found).
Framework-free (standard library and hvdkit's core): ``import hvdkit`` must stay free of frameworks.

Example::

    >>> code = supervise(["sh", "-c", "echo '[1]<stderr>:ValueError: bad' >&2; exit 3"], "/tmp/x.log")  # doctest: +SKIP
    [1]<stderr>:ValueError: bad
    hvdkit: error: rank 1 failed first (exit 3): ValueError: bad; full output: /tmp/x.log
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

from .errors import HvdkitError
from .run_state import COMPLETE_MARK, START_MARK

GRACE = 10.0        # seconds the launcher gets to stop its workers after a forwarded signal
DRAIN = 5.0         # seconds to read what is left in the pipe once the launcher has exited
INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}   # 128 + signal number

# A worker line's tag: "[1]<stderr>:" (horovodrun) or "[1,1]<stderr>:" (mpirun --tag-output: [jobid,rank]).
TAG = re.compile(r"\[(?:\d+,)?(\d+)\]<(stdout|stderr)>:")
MPI_TAG = re.compile(r"\[\d+,\d+\]<(?:stdout|stderr)>:")
# A Python exception line: "ValueError: ...", "torch.distributed.DistBackendError: ...", "KeyboardInterrupt".
EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure)\b(?::|$)")
# A launcher line that says what went wrong ("discover_hosts: cannot read hosts file ...", "horovodrun: error: ...").
ERROR_HINT = re.compile(r"\berror\b|cannot|can't|could not|failed|not found|no such|refused|denied|timed out"
                        r"|unable", re.I)
# The launchers' generic last words, telling only when nothing else does.
GENERIC = re.compile(r"Job has been shutdown|Horovod detected that one or more processes exited")
DASHES = re.compile(r"^-{20,}\s*$")     # mpirun frames its messages with lines of dashes
# mpirun's blocks that only restate that a worker failed (the summary line says it better).
MPIRUN_NOISE = re.compile(r"Primary job\s+terminated normally|mpirun detected that one or more processes exited"
                          r"|mpirun noticed that process rank|mpirun has exited due to process rank")
# A rank's line saying it stopped because another rank failed (hvdkit.trainer): not the origin of a failure.
SECONDARY = "another rank failed or left the job"
# What rank 0's trainer logs once every rank finished fit.
COMPLETE_LINE = f"[hvdkit rank 0] {COMPLETE_MARK}:"
START_LINE = f"[hvdkit rank 0] {START_MARK}"
# A rank's line naming the failing rank itself (the trainer's): in elastic jobs every rank prints it, and the
# launcher's numbers are initial ranks, so the line is the summary as it is.
NAMES_FAILING_RANK = re.compile(r"^hvdkit: error: rank \d+ failed ")
# Launcher lines naming the first failing worker.
HOROVOD_EXIT = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.")
HOROVOD_TERMINATING = re.compile(r"^Terminating remaining workers after failure of Process \d+\.")
MPI_PROCESS = re.compile(r"^\s*Process name:\s*\[\[\d+,\d+\],(\d+)\]")
MPI_EXIT = re.compile(r"^\s*Exit code:\s*(-?\d+)")
MPI_SIGNAL = re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)")


@dataclasses.dataclass
class Line:
    """One line of the launcher's output; ``rank``/``stream`` set for a worker's tagged line, ``body`` untagged.

    >>> Line.parse("[1,0]<stderr>:oops")
    Line(text='[1,0]<stderr>:oops', rank=0, stream='stderr', body='oops')
    """
    text: str
    rank: Optional[int] = None
    stream: Optional[str] = None
    body: str = ""

    @classmethod
    def parse(cls, text: str) -> "Line":
        tag = TAG.match(text)
        if not tag:
            return cls(text, body=text)
        return cls(text, int(tag.group(1)), tag.group(2), text[tag.end():])


class MpiTagJoiner:
    """Rebuilds whole worker lines from ``mpirun --tag-output``, which tags every write, not every line.

    Python writes a message and its newline apart to an unbuffered stream (and a traceback in pieces), and
    ranks interleave, so mpirun's physical lines look like ``[1,1]<stderr>:ValueError[1,1]<stderr>:: [1,1]<stderr>:x``
    or ``[1,1]<stdout>:ready[1,0]<stdout>:ready``. Each tagged piece is appended to its (rank, stream) buffer; the
    newline ends the buffer of the last tag before it. Lines without mpirun's ``[job,rank]`` tags (horovodrun's
    ``[rank]`` lines are whole already, launcher lines) pass through.

    >>> j = MpiTagJoiner()
    >>> j.feed("[1,1]<stdout>:ready[1,0]<stdout>:ready") + j.feed("[1,1]<stdout>:")
    ['[1,0]<stdout>:ready', '[1,1]<stdout>:ready']
    """

    def __init__(self) -> None:
        self.pending: Dict[str, str] = {}   # tag -> text written so far without its newline

    def feed(self, text: str) -> List[str]:
        tags = list(MPI_TAG.finditer(text))
        if not tags:
            return [text]
        out = [text[:tags[0].start()]] if tags[0].start() > 0 else []   # untagged lead: the launcher's
        for tag, after in zip(tags, tags[1:] + [None]):
            piece = text[tag.end():after.start() if after else len(text)]
            self.pending[tag.group(0)] = self.pending.get(tag.group(0), "") + piece
        last = tags[-1].group(0)
        out.append(last + self.pending.pop(last))
        return out

    def flush(self) -> List[str]:
        """Pieces never ended by a newline (the launcher died mid-line)."""
        out = [tag + text for tag, text in self.pending.items() if text]
        self.pending.clear()
        return out


class NoiseFilter:
    """Decides which lines reach the terminal: worker lines always; launcher lines unless they are its failure
    report (traceback, exit-status lines, mpirun's failure banners). Feed lines in order; ``flush`` at the end.

    >>> f = NoiseFilter()
    >>> [l.text for t in ["[0]<stderr>:hi", "Traceback (most recent call last):", '  File "x"',
    ...                   "RuntimeError: Horovod detected ...", "Process name: 0", "Exit code: 2"]
    ...  for l in f.feed(Line.parse(t))]
    ['[0]<stderr>:hi']
    """

    def __init__(self) -> None:
        self.state = "normal"           # normal | trace (inside a traceback) | tail (after its exception line)
        self.banner: List[Line] = []    # an mpirun dash-framed block being collected

    def feed(self, line: Line) -> List[Line]:
        if line.rank is not None:       # a worker's own line: never hidden
            return [line]
        if self.banner:
            return self._banner(line)
        if self.state != "normal" and self._in_traceback(line.text):
            return []
        text = line.text
        if text.startswith(("Traceback (most recent call last):", "Exception in thread ")):
            self.state = "trace"
            return []
        if DASHES.match(text):
            self.banner = [line]
            return []
        if HOROVOD_EXIT.match(text) or HOROVOD_TERMINATING.match(text) or "Job has been shutdown" in text:
            return []
        return [line]

    def _banner(self, line: Line) -> List[Line]:
        """Collect an mpirun block; once complete, show it unless it only restates that a worker failed."""
        self.banner.append(line)
        if not DASHES.match(line.text):
            return []
        block, self.banner = self.banner, []
        return [] if MPIRUN_NOISE.search("\n".join(l.text for l in block)) else block

    def _in_traceback(self, text: str) -> bool:
        """Whether a line still belongs to the launcher's traceback (and moves the state along)."""
        indented = text.startswith((" ", "\t"))
        if self.state == "trace":
            if text.strip() and not indented and not text.startswith("Traceback (most recent call last):"):
                self.state = "tail"     # the exception line ends the frames
            return True
        if indented:                    # tail: two threads' tracebacks interleave (elastic), frames go on
            self.state = "trace"
            return True
        # the RuntimeError's "Process name: / Exit code:" lines, and chained tracebacks
        if not text.strip() or text.startswith(("Process name:", "Exit code:", "During handling",
                                                "The above exception")):
            return True
        self.state = "normal"
        return False

    def flush(self) -> List[Line]:
        """An unterminated banner (the launcher died mid-message) is shown as it is."""
        block, self.banner = self.banner, []
        return block


class FailureTracker:
    """Finds the first failing rank (as the launcher reports it) and each rank's most telling error line.

    >>> t = FailureTracker()
    >>> for text in ["[1]<stderr>:hvdkit: error: bad flag", "Process 1 exit with status code 2."]:
    ...     t.feed(Line.parse(text))
    >>> t.first_failure, t.error_line(1)
    ((1, 2), 'hvdkit: error: bad flag')
    """

    def __init__(self) -> None:
        self.first_failure: Optional[Tuple[int, int]] = None   # (rank, exit code as the launcher saw it)
        self.best: Dict[int, Tuple[int, str]] = {}             # rank -> (priority, line)
        self.first_error_rank: Optional[int] = None
        self.hint: Optional[str] = None                        # first shown launcher line saying what failed
        self.banner_first: Optional[str] = None                # first line of the first mpirun message shown
        self.exceptions: List[str] = []                        # exception lines of the launcher's tracebacks
        self.launcher_last: Optional[str] = None
        self.failures: List[Tuple[int, int]] = []              # every (rank, exit code) the launcher reported
        self.completed = False                                 # rank 0's trainer said every rank finished fit
        self.failures_before_complete = 0
        self._after_dashes = False
        self._mpi_rank: Optional[int] = None                   # "Process name:" seen, "Exit code:" next

    def feed(self, line: Line) -> None:
        if line.rank is not None:
            self._worker(line)
        else:
            self._launcher(line.text)

    def _worker(self, line: Line) -> None:
        body = line.body.strip()
        if not body:
            return
        if COMPLETE_LINE in body:
            self.completed, self.failures_before_complete = True, len(self.failures)
        elif START_LINE in body:   # a script's next fit: not complete until it says so
            self.completed = False
        # hvdkit's own error line says the most (unless it only says another rank failed), then a Python exception
        # line, then anything on stderr.
        priority = (3 if "hvdkit: error:" in body and SECONDARY not in body else
                    2 if "hvdkit: error:" in body or EXCEPTION.match(body) else 1 if line.stream == "stderr" else 0)
        if priority >= 2 and self.first_error_rank is None:
            self.first_error_rank = line.rank
        if priority >= self.best.get(line.rank, (-1, ""))[0]:
            self.best[line.rank] = (priority, body)

    def _launcher(self, text: str) -> None:
        stripped = text.strip()
        found = HOROVOD_EXIT.match(text)
        if found and int(found.group(2)) != 0:
            self._fail(int(found.group(1)), int(found.group(2)))
        found = MPI_SIGNAL.search(text)
        if found:
            self._fail(int(found.group(1)), 128 + int(found.group(2)))
        found = MPI_PROCESS.match(text)
        if found:
            self._mpi_rank = int(found.group(1))
        found = MPI_EXIT.match(text)
        if found and self._mpi_rank is not None:
            self._fail(self._mpi_rank, int(found.group(1)))
            self._mpi_rank = None
        if EXCEPTION.match(text):
            self.exceptions.append(stripped)

    def shown(self, line: Line) -> None:
        """A launcher line that reached the terminal (not noise): a candidate for what went wrong."""
        stripped = line.text.strip()
        if line.rank is not None or not stripped:
            return
        if DASHES.match(stripped):
            self._after_dashes = True
            return
        if self._after_dashes and self.banner_first is None:
            self.banner_first = stripped
        self._after_dashes = False
        if self.hint is None and ERROR_HINT.search(stripped):
            self.hint = stripped
        self.launcher_last = stripped

    def launcher_message(self) -> str:
        """What the launcher said went wrong, the most telling line first."""
        specific = [e for e in self.exceptions if not GENERIC.search(e)]
        return (self.hint or self.banner_first or (specific or [None])[0] or (self.exceptions or [None])[0]
                or self.launcher_last or "no error message")

    def _fail(self, rank: int, code: int) -> None:
        self.failures.append((rank, code))
        if self.first_failure is None:
            self.first_failure = (rank, code)

    def origin(self) -> Optional[Tuple[int, int]]:
        """The failure to report: the first the launcher named, unless that rank only stopped because another
        failed (hvdkit says so) and a rank with an error of its own also failed: then that one."""
        if self.first_failure is None:
            return None
        rank, _ = self.first_failure
        if SECONDARY in (self.error_line(rank) or ""):
            for other, code in self.failures:
                if self.best.get(other, (0, ""))[0] == 3:
                    return other, code
        return self.first_failure

    def lost_after_completion(self) -> bool:
        """Training completed (rank 0 said so) and every failure the launcher reported is a worker killed by a
        signal: a worker lost while the finished job was shutting down."""
        return (self.completed and len(self.failures) > self.failures_before_complete == 0
                and all(code < 0 or code > 128 for _, code in self.failures))

    def error_line(self, rank: int) -> Optional[str]:
        return self.best.get(rank, (0, None))[1]


def exit_code_for(worker_code: int) -> int:
    """hvdkit launch's exit code for a failed worker: its own code when that is a plain one (1..125).

    >>> exit_code_for(2), exit_code_for(137), exit_code_for(-9)
    (2, 1, 1)
    """
    return worker_code if 1 <= worker_code <= 125 else 1


def _describe(code: int) -> str:
    """'exit 2', or 'killed by signal 9' for the shell's 128+N and Python's -N."""
    if code < 0:
        return f"killed by signal {-code}"
    if 128 < code < 160:
        return f"killed by signal {code - 128}"
    return f"exit {code}"


def summary(tracker: FailureTracker, launcher: str, returncode: int, log_path: str,
            interrupted: Optional[int] = None) -> Tuple[Optional[str], int]:
    """(the one summary line or None, hvdkit launch's exit code) for a finished launcher.

    >>> t = FailureTracker()
    >>> t.feed(Line.parse("[1]<stderr>:ValueError: x")); t.feed(Line.parse("Process 1 exit with status code 1."))
    >>> summary(t, "horovodrun", 1, "/tmp/l.log")
    ('hvdkit: error: rank 1 failed first (exit 1): ValueError: x; full output: /tmp/l.log', 1)
    """
    where = f"; full output: {log_path}"
    if interrupted is not None:
        name = signal.Signals(interrupted).name
        return f"hvdkit: error: interrupted by {name}; the job was stopped{where}", INTERRUPTED[interrupted]
    if returncode == 0:
        return None, 0
    if tracker.lost_after_completion():
        lost = ", ".join(f"rank {rank} ({_describe(code)})" for rank, code in tracker.failures)
        return (f"hvdkit: warning: training completed and its outputs were written; {lost} lost while the job "
                f"was ending, so {launcher} exited {returncode}: treated as success{where}"), 0
    if tracker.first_failure is not None:
        rank, code = tracker.origin()
        said = tracker.error_line(rank)
        if said and NAMES_FAILING_RANK.match(said):
            return f"{said}{where}", exit_code_for(code)
        said = f": {said}" if said else " without an error line of its own"
        return f"hvdkit: error: rank {rank} failed first ({_describe(code)}){said}{where}", exit_code_for(code)
    if tracker.first_error_rank is not None:   # the launcher did not say who failed first: the first rank to complain
        rank = tracker.first_error_rank
        return f"hvdkit: error: rank {rank} failed: {tracker.error_line(rank)}{where}", 1
    said = tracker.launcher_message()
    return f"hvdkit: error: {launcher} failed ({_describe(returncode)}): {said}{where}", 1


def default_log_path() -> str:
    """A log file of its own per run in the temp directory (concurrent launches must not share one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(tempfile.gettempdir(), f"hvdkit-launch-{stamp}-{os.getpid()}.log")


def _become_subreaper() -> None:
    """Orphaned descendants (horovodrun's workers live in sessions of their own) are reparented to us, so the
    cleanup finds them. Linux only; elsewhere the process group kill is all we do."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _descendants() -> List[int]:
    """Live descendants of this process, from /proc (empty where /proc is missing)."""
    children: Dict[int, List[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def _kill_leftovers(pgid: int) -> None:
    """SIGTERM, then SIGKILL, the launcher's group and every descendant still alive; reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _descendants()
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 3.0
        while _descendants() and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
        if not _descendants():
            break
    _reap()


def _reap() -> None:
    """Collect exit statuses of reparented orphans (the launcher itself is waited for before this runs)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class _Output:
    """Writes lines to the log (all) and the terminal (worker lines to their own stream, launcher lines to
    stderr); a closed terminal (``| head``) does not stop the log."""

    def __init__(self, log: TextIO, out: TextIO, err: TextIO) -> None:
        self.log, self.out, self.err = log, out, err

    def show(self, line: Line) -> None:
        stream = self.out if line.stream == "stdout" else self.err
        try:
            stream.write(line.text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass


def _pump(pipe, output: _Output, tracker: FailureTracker, verbose: bool) -> None:
    """Read the launcher's merged output to EOF: log it, track failures, show what the filter keeps."""
    noise, joiner = NoiseFilter(), MpiTagJoiner()

    def handle(pieces: List[str]) -> None:
        for piece in pieces:
            line = Line.parse(piece)
            tracker.feed(line)
            show(noise.feed(line))

    def show(lines: List[Line]) -> None:
        for line in lines:
            tracker.shown(line)
            if not verbose:          # verbose: the raw line was shown already
                output.show(line)

    for raw in iter(pipe.readline, b""):
        text = raw.decode("utf-8", errors="replace")
        try:
            output.log.write(text)
            output.log.flush()
        except ValueError:          # the log was closed: the launcher is long gone, stop reading
            return
        text = text.rstrip("\n")
        if verbose:
            output.show(Line.parse(text))
        handle(joiner.feed(text))
    handle(joiner.flush())
    show(noise.flush())


def _launcher_name(cmd: Sequence[str]) -> str:
    """``horovodrun`` for ``[".../horovodrun", ...]`` and for ``["env", "A=1", ".../horovodrun", ...]``."""
    args = list(cmd)
    if args and os.path.basename(args[0]) == "env":
        args = [a for a in args[1:] if "=" not in a] or args
    return os.path.basename(args[0])


def supervise(cmd: Sequence[str], log_path: Optional[str] = None, verbose: bool = False,
              keep_log: bool = True, env: Optional[Dict[str, str]] = None,
              out: TextIO = None, err: TextIO = None) -> int:
    """Run launcher ``cmd`` to the end and return hvdkit launch's exit code (see the module docstring).

    ``log_path`` (default :func:`default_log_path`) gets the complete output; with ``keep_log=False`` it is
    removed after a successful job. ``verbose`` shows every line unfiltered.
    """
    out, err = out or sys.stdout, err or sys.stderr
    log_path = os.path.abspath(log_path or default_log_path())
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")   # launcher and workers write to pipes: line by line, not at exit
    tracker = FailureTracker()
    got: List[int] = []
    _become_subreaper()
    procs: List[subprocess.Popen] = []
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        previous = _forward_signals(procs, got)
        try:
            try:
                proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            except OSError as e:
                raise HvdkitError(f"cannot start {cmd[0]} ({e.strerror}); check it with hvdkit doctor") from None
            procs.append(proc)
            if got:                   # a signal came while the launcher was starting
                _signal_group(proc, got[0])
            reader = threading.Thread(target=_pump, args=(proc.stdout, _Output(log, out, err), tracker, verbose),
                                      daemon=True)
            reader.start()
            returncode = proc.wait()
            reader.join(DRAIN)        # workers in other sessions may still hold the pipe: do not wait forever
        finally:
            _restore_signals(previous)
            for proc in procs:
                if proc.returncode is None:
                    _killpg(proc.pid)
                    proc.wait()
                _kill_leftovers(proc.pid)   # after the launcher was waited for: _reap must not take its status
        reader.join(DRAIN)
    line, code = summary(tracker, _launcher_name(cmd), returncode, log_path, got[0] if got else None)
    if line:
        print(line, file=err, flush=True)
    elif not keep_log:
        os.remove(log_path)
    return code


def _forward_signals(procs: List[subprocess.Popen], got: List[int]) -> Dict[int, object]:
    """Install handlers (before the launcher starts, so no signal finds it unguarded): SIGINT/SIGTERM/SIGHUP go to
    the launcher's group (it stops its workers); a second one, or ``GRACE`` s without the launcher exiting, kills
    the group. ``got`` records the signals (the first decides the exit code); ``procs`` gets the launcher."""
    def handler(signum, frame):
        got.append(signum)
        if procs:
            _signal_group(procs[0], signum if len(got) == 1 else signal.SIGKILL)

    previous = {}
    for sig in INTERRUPTED:
        previous[sig] = signal.signal(sig, handler)
    return previous


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the launcher's group; after the first, arm the ``GRACE`` timer that kills it."""
    try:
        os.killpg(proc.pid, sig)
    except OSError:
        pass
    if sig != signal.SIGKILL:
        timer = threading.Timer(GRACE, lambda: proc.returncode is None and _killpg(proc.pid))
        timer.daemon = True
        timer.start()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _restore_signals(previous: Dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
