"""`pulse-batch ARGS` for tests: in this process (typer's CliRunner on `batch.cli.app`), or as
a child process where a real process is the point (signals, SIGKILL, a fresh interpreter).

`run_cli` returns what `subprocess.run` would (``returncode``, ``stdout``, ``stderr``), and
puts back what the CLI changes for its own process: logging (its handler replaces the root
logger's), signal handlers, the environment and the working directory; and each run starts
without fsspec's cached filesystems, as a child would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from typer.testing import CliRunner

from batch import cli, cli_exits
from batch.logjson import use_log_format
from batch.observe import StderrConsole

# One unit for every wait in the tests; raise it on a slow machine.
TIME_UNIT_S = float(os.environ.get("PULSE_BATCH_TEST_TIME_UNIT", "1.0"))


@dataclass(frozen=True)
class CliResult:
    """What a run of the CLI said: as `subprocess.CompletedProcess` has it."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Both streams, as a terminal shows them (stdout first)."""
        return self.stdout + self.stderr


def _fresh_filesystems() -> None:
    """Forget fsspec's cached filesystems, as a new process starts without them: fsspec
    keys an instance by its arguments, not by the environment its credentials came from."""
    pending = [fsspec.AbstractFileSystem]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "_cache" in cls.__dict__:
            cls.clear_instance_cache()


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Restore logging, SIGINT/SIGTERM handlers, os.environ and the cwd on leaving."""
    root = logging.getLogger()
    named = [lg for lg in list(root.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    loggers = [root, *named]
    saved_logging = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    environ, cwd = dict(os.environ), os.getcwd()
    console = cli_exits.err
    # As a child's piped stderr is: no colour, no terminal, no wrapping.
    cli_exits.err = StderrConsole(
        stderr=True, soft_wrap=True, color_system=None, force_terminal=False
    )
    _fresh_filesystems()
    try:
        yield
    finally:
        _fresh_filesystems()
        cli_exits.err = console
        use_log_format("text")  # and Python's warnings no longer captured by logging
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        if main_thread:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        for lg, level, kept in saved_logging:
            lg.setLevel(level)
            lg.handlers[:] = kept
        # A logger the CLI made from a placeholder (``batch.server``) gets no level of its own.
        saved = {id(lg) for lg, _, _ in saved_logging}
        for name, made in list(root.manager.loggerDict.items()):
            if isinstance(made, logging.Logger) and id(made) not in saved and _ours(name):
                made.setLevel(logging.NOTSET)


def _ours(name: str) -> bool:
    return name == "batch" or name.startswith("batch.")


def run_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """``pulse-batch ARGS`` in this process, with ``env`` added to the environment. An
    exception the CLI did not turn into an exit code is exit 1 with its traceback on
    stderr, as a child process would show it."""
    with _process_state_kept():
        done = CliRunner().invoke(cli.app, list(args), env=env, prog_name="pulse-batch")
    stderr = done.stderr
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        exc = done.exception
        stderr += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return CliResult(done.exit_code, done.stdout, stderr)


def run_cli_process(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> CliResult:
    """``python -m batch ARGS`` as a child process: for benchmarks, whose numbers must not
    share an interpreter with the test's servers."""
    done = subprocess.run(
        [sys.executable, "-m", "batch", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s * TIME_UNIT_S,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def start_cli(*args: str, capture: bool = False) -> subprocess.Popen[str]:
    """``pulse-batch ARGS`` as a child process, for tests that signal or kill it; its
    output piped (``capture``, read it with ``communicate``) or discarded."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "batch", *args], stdout=out, stderr=out, text=True
    )
