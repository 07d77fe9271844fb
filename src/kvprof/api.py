"""``kvprof.trace()``: switch recording on and off in a running engine's processes.

The hooks live in the EngineCore and worker processes (installed there by the
plugin entry point); this handle only sends them ``kvprof_start`` /
``kvprof_stop`` through vLLM's utility-call channel.
"""
from __future__ import annotations

import contextlib
import os

from kvprof.errors import EngineNotTraceable
from kvprof.recorder.session import parts_dir, prepare_target


class Trace:
    """A start/stop handle; also a context manager (``with``, or ``async with`` for AsyncLLM)."""

    def __init__(self, engine, path, *, overwrite: bool = False, detail: str = "blocks",
                 flush_interval_s: float = 1.0, flush_rows: int = 65536,
                 record_prompts: bool = False, py_spy: bool | None = None,
                 _fault_point: str | None = None):
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self.options = {"detail": detail, "flush_interval_s": flush_interval_s,
                        "flush_rows": flush_rows, "record_prompts": record_prompts,
                        "fault_point": _fault_point, "overwrite": overwrite,
                        "py_spy": _py_spy_wanted(py_spy)}
        self.client, self.is_async = _engine_core_client(engine)
        self.summary: dict | None = None
        self.started: dict | None = None   # the EngineCore's answer: its pid, the workers' pids
        self.active = False

    # ------------------------------------------------------------ sync
    def start(self) -> "Trace":
        self._prepare()
        self.started = self._started(self._call("kvprof_start", self.path, self.options))
        self.active = True
        return self

    def stop(self) -> dict:
        if not self.active:
            return self.summary or {}
        self.active = False
        self.summary = self._call("kvprof_stop")
        return self.summary

    def status(self) -> dict:
        """The EngineCore's view once its writers have caught up: tracing or not, steps
        recorded, warnings emitted, and each worker's ``tracing``. Everything recorded
        before the call is on disk when it returns, and a write error has been acted on."""
        return self._call("kvprof_status")

    def __enter__(self) -> "Trace":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.stop()
            return
        try:   # the block's own error (say vLLM's EngineDeadError) is the one the caller sees
            self.stop()
        except Exception:
            self.active = False

    # ----------------------------------------------------------- async
    async def start_async(self) -> "Trace":
        self._prepare()
        answers = await self._call_async("kvprof_start", self.path, self.options)
        for answer in answers:
            _checked_start(answer)
        self.started = self._started(_with_replicas(answers))
        self.active = True
        return self

    async def stop_async(self) -> dict:
        if not self.active:
            return self.summary or {}
        self.active = False
        self.summary = _with_replicas(await self._call_async("kvprof_stop"))
        return self.summary

    async def status_async(self) -> dict:
        """``status()`` for AsyncLLM (every replica's, under ``replicas``, with data parallel)."""
        return _with_replicas(await self._call_async("kvprof_status"))

    async def _call_async(self, method: str, *args) -> list:
        """One answer per EngineCore: a data-parallel AsyncLLM has one per replica, and
        each must start and stop its own trace (``NAME.dp<rank>.arrow``)."""
        engines = getattr(self.client, "core_engines", None) or []
        if len(engines) > 1 and hasattr(self.client, "call_utility_all_async"):
            return list(await self.client.call_utility_all_async(method, *args))
        return [await self.client.call_utility_async(method, *args)]

    async def __aenter__(self) -> "Trace":
        return await self.start_async()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.stop_async()
            return
        try:
            await self.stop_async()
        except Exception:
            self.active = False

    # --------------------------------------------------------- helpers
    def _prepare(self) -> None:
        ensure_supported()
        prepare_target(self.path, self.overwrite)

    def _started(self, answer) -> dict:
        """The EngineCore's answer; data-parallel replicas write next to ``path``
        (``.dp<rank>``), so the parts folder prepared for ``path`` itself goes."""
        started = _checked_start(answer)
        if started.get("path", self.path) != self.path:
            with contextlib.suppress(OSError):
                os.rmdir(parts_dir(self.path))   # only if empty
        return started

    def _call(self, method: str, *args):
        if self.is_async:
            raise EngineNotTraceable("AsyncLLM is traced with 'async with kvprof.trace(...)'")
        inproc = getattr(self.client, "engine_core", None)
        if inproc is not None and hasattr(inproc, method):   # InprocClient: same process
            return getattr(inproc, method)(*args)
        return self.client.call_utility(method, *args)


def _py_spy_wanted(py_spy: bool | None) -> bool:
    """``py_spy=None``: as ``KVPROF_PY_SPY`` says (host stacks sampled with py-spy)."""
    if py_spy is not None:
        return bool(py_spy)
    from kvprof.recorder.pyspy import env_enabled
    return env_enabled()


def ensure_supported() -> None:
    """Raise UnsupportedVllmVersion now when kvprof cannot hook this vLLM: before an engine
    is started for nothing (``kvprof run`` and ``kvprof sweep`` call it first)."""
    from kvprof.hooks import plugin
    plugin.register()
    if plugin.status()["unsupported"]:
        from kvprof.errors import UnsupportedVllmVersion
        raise UnsupportedVllmVersion(plugin.status()["unsupported"])


def _with_replicas(answers: list):
    """The first EngineCore's answer, plus all of them under ``replicas`` when there are several."""
    first = answers[0]
    if len(answers) == 1 or not isinstance(first, dict):
        return first
    return {**first, "replicas": list(answers)}


def _checked_start(answer):
    """The EngineCore could not open the trace's files (a full disk): a clear error here."""
    if isinstance(answer, dict) and answer.get("error"):
        from kvprof.errors import TraceTargetError
        raise TraceTargetError(answer["error"])
    return answer


def _engine_core_client(engine):
    """Find the EngineCore client of an LLM, LLMEngine or AsyncLLM."""
    inner = getattr(engine, "llm_engine", engine)          # LLM -> LLMEngine
    client = getattr(inner, "engine_core", None)
    if client is None:
        raise EngineNotTraceable(
            f"kvprof.trace() needs a vLLM LLM, LLMEngine or AsyncLLM, not {type(engine).__name__}")
    return client, hasattr(client, "call_utility_async") and not hasattr(client, "call_utility")
