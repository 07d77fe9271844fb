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

# Set KVPROF_FAULT=<hook name> to make that hook raise (fault-injection tests).
FAULT_POINT = os.environ.get("KVPROF_FAULT") or None


class InjectedFault(RuntimeError):
    """Raised by a hook named in KVPROF_FAULT, to test that faults stay contained."""


class ProcessState:
    """The recorder active in this process (None when not tracing)."""

    recorder = None          # the EngineCore's recorder, read by every scheduler / pool hook
    worker_recorder = None   # the forward-timing recorder of a worker (may share the process)
    warned = False
    warnings_emitted = 0     # across this process's life; tests check it stays at one per failure

    @classmethod
    def fail(cls, where: str, exc: BaseException) -> None:
        recorder, cls.recorder = cls.recorder, None
        if not cls.warned:
            cls.warned = True
            cls.warnings_emitted += 1
            log.warning("kvprof: tracing turned off after an error in hook %s: %s: %s",
                        where, type(exc).__name__, exc)
        if recorder is not None:
            try:
                recorder.close(cut_short=f"hook {where} failed: {type(exc).__name__}: {exc}")
            except Exception:
                pass


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
                if FAULT_POINT == where:
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
                if FAULT_POINT == where and before is None:
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
