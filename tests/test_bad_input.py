"""The README's "Bad input: what you see" table, row by row: the table is parsed here, so it cannot drift.

Each row: an input cell of backticked commands (all but the last are set-up; "good run" first copies the
checkpoints of the README's good run into ``{ckpt}``), the one line the last command prints, its exit code, and
how it runs: "in-process" (this interpreter, world size 1, ``LocalProcess`` in place of Horovod; ``hvdkit ...``
is ``hvdkit.cli.main``, ``python x.py`` / ``python -m m`` run through runpy, ``Trainer(...)`` rows are Python run
under ``main_guard``) or "process" (the real command, with a timeout: tests/proc.py). Set-up commands other than
those are shell commands. Checked for every row: the exit code; the line (the last ``hvdkit: error:`` line of
stderr, else its last line; for exit 0 any stderr line) against the table's, placeholders filled in; no
traceback unless the row says "traceback kept"; every file that existed in ``{tmp}`` before the command is
byte-for-byte the same after it (no lost data).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import traceback
import warnings
from typing import Dict, List, NamedTuple

import pytest

from proc import REPO, explain, file_contents, run

README = os.path.join(REPO, "README.md")
SECTION = "## Bad input: what you see"
SHELL = ("touch", "printf", "echo", "truncate", "rm", "mkdir")
ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")
# what a line may hold that differs from machine to machine or run to run
WILDCARDS = {"{n}": r"\d+", "{rank}": r"\d+"}


class Row(NamedTuple):
    number: int
    setup: List[str]
    command: str
    good_run: bool
    line: str
    exit: int
    in_process: bool
    traceback_kept: bool


def _section() -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end > 0 else len(text)]


def _spans(cell: str) -> List[str]:
    return re.findall(r"`([^`]+)`", cell)


def good_run_command() -> str:
    found = [l for l in _section().splitlines() if l.startswith("**Good run**")]
    assert len(found) == 1, "the README section must define exactly one **Good run**"
    return _spans(found[0])[0]


def table() -> List[Row]:
    rows = []
    for raw in _section().splitlines():
        if not re.match(r"^\|\s*\d+\s*\|", raw):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", raw.strip()[1:-1])]
        assert len(cells) == 5, f"a row needs 5 cells: {raw}"
        number, given, line, code, how = cells
        commands, lines = _spans(given), _spans(line)
        assert commands and len(lines) == 1 and how in ("in-process", "process"), f"malformed row: {raw}"
        prose = re.sub(r"`[^`]+`", "", given)
        rows.append(Row(int(number), commands[:-1], commands[-1], "good run" in prose, lines[0], int(code),
                        how == "in-process", "traceback kept" in prose))
    return rows


ROWS = table()


def test_the_table_is_long_and_numbered():
    assert len(ROWS) >= 25
    assert [r.number for r in ROWS] == list(range(1, len(ROWS) + 1))


# ---------------------------------------------------------------- running one command

def _fill(text: str, places: Dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace(key, value)
    return text


def _split(command: str):
    """(env, kind, argv): kind is python / hvdkit / api / shell."""
    if command.startswith("Trainer("):
        return {}, "api", [command]
    words = shlex.split(command)
    env = {}
    while words and ENV_WORD.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    kind = words[0] if words[0] in ("python", "hvdkit") else "shell"
    assert kind != "shell" or words[0] in SHELL, f"unknown command in the table: {command}"
    return env, kind, words[1:] if kind != "shell" else words


@contextlib.contextmanager
def _captured():
    """sys.stdout/sys.stderr into buffers, and hvdkit's rank loggers (whose handlers keep the stream they were
    made with) with them; everything put back after."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr

    def handlers():
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if name.startswith("hvdkit") and isinstance(logger, logging.Logger):
                yield from (h for h in logger.handlers if type(h) is logging.StreamHandler)   # not pytest's

    before = {h: h.stream for h in handlers()}
    for h in before:
        h.setStream(err)
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved
        for h in handlers():
            h.setStream(before.get(h, saved[1]))


def _api_namespace():
    import torch
    from hvdkit import TrainConfig, Trainer
    from hvdkit.datasets import digits_split
    from hvdkit.torch import TorchAdapter
    x, y, x_test, y_test = digits_split()
    model = torch.nn.Sequential(torch.nn.Linear(64, 10))
    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy)
    return dict(Trainer=Trainer, TrainConfig=TrainConfig, adapter=adapter, x=x, y=y, x_test=x_test, y_test=y_test)


def _in_process(kind: str, argv: List[str], env: Dict[str, str], monkeypatch):
    """Run one command in this interpreter; (exit code, stdout, stderr)."""
    from hvdkit import cli, supervise
    from hvdkit.scripting import main_guard
    from hvdkit.torch import adapter as torch_adapter
    from hvdkit.torch.process import LocalProcess

    def must_not_launch(*args, **kw):
        raise AssertionError("an in-process row got past the preflight: it would start a launcher")

    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        m.setattr(torch_adapter, "HorovodProcess", LocalProcess)   # world size 1 without Horovod
        m.setattr(supervise, "supervise", must_not_launch)
        m.chdir(REPO)
        with _captured() as (out, err):
            try:
                if kind == "hvdkit":
                    code = cli.main(argv)
                elif kind == "api":
                    namespace = _api_namespace()
                    main_guard(lambda: exec(argv[0], namespace))()
                    code = 0
                else:
                    m.setattr(sys, "argv", list(argv))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)   # runpy: "found in sys.modules"
                        if argv[0] == "-m":
                            m.setattr(sys, "argv", argv[1:])
                            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                        else:
                            runpy.run_path(argv[0], run_name="__main__")
                    code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    return code, out.getvalue(), err.getvalue()


def _as_process(kind: str, argv: List[str], env: Dict[str, str]):
    cmd = [sys.executable, *argv] if kind == "python" else [sys.executable, "-m", "hvdkit.cli", *argv]
    result = run(cmd, timeout=240, env=env)
    return result.returncode, result.stdout, result.stderr, explain(result)


def _shell(command: str) -> None:
    done = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"set-up {command!r} failed: {done.stderr}"


def _shown(stderr: str, expected: str, code: int):
    """The line the row is about: see the module docstring."""
    lines = [l for l in stderr.splitlines() if l.strip()]
    if code == 0:
        return lines
    errors = [l for l in lines if l.startswith("hvdkit: error:")]
    return errors[-1:] if errors and expected.startswith("hvdkit: error:") else lines[-1:]


def _pattern(line: str, places: Dict[str, str]) -> "re.Pattern[str]":
    keys = list(places) + list(WILDCARDS)
    parts = re.split("(" + "|".join(re.escape(k) for k in keys) + ")", line)
    return re.compile("".join(re.escape(places[p]) if p in places else WILDCARDS[p] if p in WILDCARDS
                              else re.escape(p) for p in parts))


# ---------------------------------------------------------------- the rows

@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory):
    """The README's good run, once: its checkpoint directory, copied into each row that starts from it."""
    ckpt = str(tmp_path_factory.mktemp("good") / "ckpt")
    env, kind, argv = _split(_fill(good_run_command(), {"{ckpt}": ckpt}))
    with pytest.MonkeyPatch.context() as m:
        code, out, err = _in_process(kind, argv, env, m)
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(ckpt)) == [f"ckpt-0000000{i}.{ext}" for i in (0, 1) for ext in ("bin", "json")]
    return ckpt


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.number}-{re.sub(r'[^a-z0-9]+', '-', r.command.lower())[:40]}"
                                           for r in ROWS])
def test_row(row, tmp_path, monkeypatch, request):
    places = {"{tmp}": str(tmp_path), "{ckpt}": str(tmp_path / "ckpt"), "{python}": sys.executable,
              "{repo}": REPO}
    if row.good_run:
        shutil.copytree(request.getfixturevalue("good_checkpoints"), places["{ckpt}"])
    for step in row.setup:
        assert _split(step)[1] == "shell", f"set-up steps are shell commands: {step}"
        _shell(_fill(step, places))
    before = file_contents(str(tmp_path))

    env, kind, argv = _split(_fill(row.command, places))
    if row.in_process:
        code, out, err = _in_process(kind, argv, env, monkeypatch)
        context = f"exit {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-6000:]}"
    else:
        code, out, err, context = _as_process(kind, argv, env)

    assert code == row.exit, context
    expected = _pattern(row.line, places)
    shown = _shown(err, row.line, code)
    assert any(expected.fullmatch(l) for l in shown), f"expected {expected.pattern}\n{context}"
    if code:
        assert len([l for l in err.splitlines() if l.startswith("hvdkit: error:")]) <= 1, context
    if not row.traceback_kept:
        assert "Traceback" not in err, context
    after = file_contents(str(tmp_path))
    changed = sorted(p for p, data in before.items() if after.get(p) != data)
    assert not changed, f"files changed or removed by bad input: {changed}\n{context}"
