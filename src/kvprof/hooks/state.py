"""Per-process tracing state, and the guard every hook runs its own code under.

A hook calls vLLM's original first and passes its result back unchanged; only
kvprof's bookkeeping runs inside ``guarded``. Any exception there turns tracing
off in this process, once, with one warning, and never reaches the engine.
"""
from __future__ import annotations

import functools
import logging
import os
import time

log = logging.getLogger("kvprof")
_clock = time.perf_counter_ns

# Set KVPROF_FAULT=<hook name>[@<calls to let pass>] to make that hook raise
# (fault-injection tests); ``trace(..., _fault_point=...)`` sets it per trace.
FAULT_POINT: str | None = None
_fault_skip = 0


def set_fault_point(spec: str | None) -> None:
    """``"Scheduler.schedule@10"``: the 11th call of that hook raises, the first ten record."""
    global FAULT_POINT, _fault_skip
    name, _, skip = (spec or "").partition("@")
    FAULT_POINT = name or None
    _fault_skip = int(skip or 0)


def fault_now(where: str) -> bool:
    """Called only when ``where == FAULT_POINT``: counts down the calls let pass."""
    global _fault_skip
    if _fault_skip > 0:
        _fault_skip -= 1
        return False
    return True


set_fault_point(os.environ.get("KVPROF_FAULT"))


class InjectedFault(RuntimeError):
    """Raised by a hook named in KVPROF_FAULT, to test that faults stay contained."""


class FailingBuilder:
    """A batch whose building raises on the writer thread (fault injection in the writer);
    the batch it replaces is discarded as any dropped batch is."""

    def __init__(self, where: str, replaced):
        self.where, self.replaced = where, replaced

    def __call__(self):
        raise InjectedFault(self.where)

    def discard(self, final: bool) -> None:
        discard = getattr(self.replaced, "discard", None)
        if discard is not None:
            discard(final)


class TraceWriteFailed(RuntimeError):
    """The writer thread could not write (a full disk, an injected fault): recording stops."""


def describe_failure(where: str, exc: BaseException) -> str:
    """What the warning and the end record's ``cut_short`` say."""
    if isinstance(exc, TraceWriteFailed):
        return f"the trace writer failed: {exc}"
    return f"hook {where} failed: {type(exc).__name__}: {exc}"


class ProcessState:
    """The recorder active in this process (None when not tracing)."""

    recorder = None          # the EngineCore's recorder, read by every scheduler / pool hook
    worker_recorder = None   # the forward-timing recorder of a worker (may share the process)
    warned = False
    warnings_emitted = 0     # across this process's life; tests check it stays at one per failure
    failed_end: dict | None = None   # end record of a recorder a failure closed; the next stop returns it
    worker_failed_end: dict | None = None
    writer_lock = None       # the EngineCore's hold on its trace (recorder.session.WriterLock)

    @classmethod
    def warn_off(cls, cause: str) -> None:
        """The one warning of a traced run that stopped early."""
        if not cls.warned:
            cls.warned = True
            cls.warnings_emitted += 1
            log.warning("kvprof: tracing turned off: %s", cause)

    @classmethod
    def fail(cls, where: str, exc: BaseException) -> None:
        recorder, cls.recorder = cls.recorder, None
        cause = describe_failure(where, exc)
        cls.warn_off(cause)
        if recorder is not None:
            written_cause = None if isinstance(exc, TraceWriteFailed) else cause  # the writer's error is kept
            try:
                cls.failed_end = recorder.close(cut_short=written_cause)
            except Exception as close_exc:
                cls.failed_end = {"complete": False, "cut_short": cause,
                                  "close_error": f"{type(close_exc).__name__}: {close_exc}"}


def wrap_method(cls: type, name: str, *, before=None, after=None, hook_name: str | None = None):
    """Wrap ``cls.name``: ``before(rec, self, *args)`` may return a token passed
    to ``after(rec, token, self, result, *args)``; both run only while tracing."""
    original = cls.__dict__.get(name) or getattr(cls, name)
    if getattr(original, "__kvprof_original__", None) is not None:
        return  # already wrapped in this process
    where = hook_name or f"{cls.__name__}.{name}"
    state = ProcessState

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        rec = state.recorder
        if rec is None:
            return original(self, *args, **kwargs)
        token = None
        if before is not None:
            t = _clock()
            try:
                if FAULT_POINT == where and fault_now(where):
                    raise InjectedFault(where)
                token = before(rec, self, *args, **kwargs)
            except Exception as exc:
                state.fail(where, exc)
                return original(self, *args, **kwargs)
            rec.hook_ns += _clock() - t
        result = original(self, *args, **kwargs)
        if after is not None and state.recorder is rec:
            t = _clock()
            try:
                if before is None and FAULT_POINT == where and fault_now(where):
                    raise InjectedFault(where)
                after(rec, token, self, result, *args, **kwargs)
            except Exception as exc:
                state.fail(where, exc)
            rec.hook_ns += _clock() - t
        return result

    wrapper.__kvprof_original__ = original
    setattr(cls, name, wrapper)


def unwrap_method(cls: type, name: str) -> None:
    current = cls.__dict__.get(name)
    original = getattr(current, "__kvprof_original__", None)
    if original is not None:
        setattr(cls, name, original)
