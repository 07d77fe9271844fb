"""What the engine's processes print, kept off the screen of kvprof's own commands.

vLLM, torch and Python's resource tracker print from the front end, the EngineCore
and each worker (Triton and NUMA notices, FutureWarnings, vLLM's INFO lines, the
tracker's note on vLLM's shared-memory segments at exit). ``kvprof run`` and
``kvprof sweep`` start those processes with their stdout and stderr pointed at a log
file, so the terminal shows kvprof's progress and report only; ``--verbose`` lets it
all through. kvprof's own warnings from inside the engine (lines with ``kvprof: ``)
are repeated on the terminal afterwards, and a failure shows the log's last lines.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

from kvprof.errors import KvprofError

KVPROF_MARK = "kvprof: "


class EngineOutput:
    """The log the engine's processes write to, and the terminal kvprof writes to."""

    def __init__(self, log_path: str | None, environ: dict[str, str] | None = None):
        self.log_path = log_path          # None: --verbose, everything on the terminal
        self.environ = dict(environ or {})   # set for the command's engines, then restored
        self.terminal_err = sys.stderr    # replaced, while capturing, by the real terminal

    @contextlib.contextmanager
    def capturing(self):
        """Point fds 1 and 2 at the log for the duration: every process started meanwhile
        (EngineCore, workers, the resource tracker) inherits them and prints there."""
        if self.log_path is None:
            with scoped_environ(self.environ):
                yield self
            return
        # vLLM's own handler writes to the sys.stdout of the moment it is configured, which
        # may be a caller's buffer (kvprof's CLI run in-process): keep its output to errors.
        quiet_vllm = {} if "VLLM_LOGGING_LEVEL" in os.environ else {"VLLM_LOGGING_LEVEL": "ERROR"}
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
        self.terminal_err = terminal
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            with warnings.catch_warnings(), scoped_environ({**quiet_vllm, **self.environ}):
                warnings.simplefilter("ignore")   # torch's and vLLM's, in this process
                yield self
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, log_fd):
                os.close(fd)
            terminal.close()
            self.terminal_err = sys.stderr

    def kvprof_lines(self) -> list[str]:
        """kvprof's own warnings that the engine's processes logged."""
        return [line[line.index(KVPROF_MARK):] for line in self._lines() if KVPROF_MARK in line]

    def tail(self, n: int = 8) -> list[str]:
        return self._lines()[-n:]

    def _lines(self) -> list[str]:
        if self.log_path is None or not os.path.exists(self.log_path):
            return []
        with open(self.log_path, errors="replace") as f:
            return [line.rstrip("\n") for line in f]

    @contextlib.contextmanager
    def session(self):
        """``capturing()``, then kvprof's warnings repeated on the terminal; when the engine
        failed (an error that is not one of kvprof's own refusals), the log's last lines."""
        engine_failed = False
        try:
            with self.capturing():
                yield self
        except Exception as exc:
            engine_failed = not isinstance(exc, KvprofError) or getattr(exc, "engine_failure", False)
            raise
        finally:
            self.report_after(engine_failed)

    def report_after(self, engine_failed: bool) -> None:
        """Repeat kvprof's warnings; after an engine failure, the log's last lines and where it is."""
        for line in self.kvprof_lines():
            print(line, file=sys.stderr)
        if engine_failed and self.log_path is not None:
            for line in self.tail():
                print(f"  | {line}", file=sys.stderr)
            print(f"kvprof: the engine's output is in {self.log_path}", file=sys.stderr)


def engine_output(log_path: str, verbose: bool, environ: dict[str, str] | None = None) -> EngineOutput:
    """A fresh log at ``log_path`` (or the terminal itself with ``--verbose``); ``environ``
    is set while the command's engines run."""
    if verbose:
        return EngineOutput(None, environ)
    with contextlib.suppress(FileNotFoundError):
        os.remove(log_path)
    return EngineOutput(log_path, environ)


def py_spy_environ(py_spy: bool) -> dict[str, str]:
    """``--py-spy`` is ``KVPROF_PY_SPY=1`` for the command's engines (kvprof.trace() reads it)."""
    return {"KVPROF_PY_SPY": "1"} if py_spy else {}


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]):
    """Environment variables for the engines a command starts, restored afterwards: a
    caller that runs kvprof's CLI in-process (tests, notebooks) keeps its environment."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
