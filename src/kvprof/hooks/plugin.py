"""vLLM's ``vllm.general_plugins`` entry point: installs kvprof's hooks in every process.

vLLM calls ``register()`` in the front end, in the EngineCore (before the
scheduler and block pool exist) and in each worker (before the worker class is
built). Hooks stay idle until a recorder is set: ``kvprof.trace()`` starts one
through ``EngineCore.kvprof_start`` (a utility method added here), or the
``KVPROF_TRACE`` environment variable starts one when the engine starts.
"""
from __future__ import annotations

import atexit
import os
import sys
import time

from kvprof.errors import KvprofError
from kvprof.hooks import compat
from kvprof.hooks import state
from kvprof.hooks.state import ProcessState, log, wrap_method

_clock = time.perf_counter_ns
ENV_TRACE = "KVPROF_TRACE"
ENV_OVERWRITE = "KVPROF_OVERWRITE"
ENV_DETAIL = "KVPROF_DETAIL"

_installed = False
_unsupported: str | None = None


def register() -> None:
    """Entry point; must never raise into vLLM."""
    global _installed, _unsupported
    if _installed or _unsupported:
        return
    try:
        compat.check()
        _install()
        _installed = True
    except KvprofError as exc:
        _unsupported = str(exc)
        if os.environ.get(ENV_TRACE):
            _warn_once_per_process_tree(f"kvprof: {exc}")
    except Exception as exc:  # a vLLM we cannot even inspect
        _unsupported = f"{type(exc).__name__}: {exc}"
        _warn_once_per_process_tree(
            f"kvprof: hooks not installed ({_unsupported}); the engine runs untraced")


_WARNED_ENV = "_KVPROF_UNSUPPORTED_WARNED"


def _warn_once_per_process_tree(message: str) -> None:
    """The front end, the EngineCore and every worker each run ``register()``: warn in the
    first only. The processes vLLM spawns inherit the environment, and with it this mark."""
    if os.environ.get(_WARNED_ENV):
        return
    os.environ[_WARNED_ENV] = "1"
    log.warning("%s", message)


def status() -> dict:
    return {"installed": _installed, "unsupported": _unsupported}


# ------------------------------------------------------------------ the hooks
def _install() -> None:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    def tag_and_record(rec, t0, sched, so, *a, **k):
        so.kvprof_step = rec.next_step
        rec.after_schedule(t0, so)

    wrap_method(Scheduler, "schedule", before=lambda rec, s, *a, **k: rec.before_schedule(),
                after=tag_and_record)
    wrap_method(Scheduler, "update_from_output",
                before=lambda rec, s, *a, **k: rec.before_update(),
                after=lambda rec, t2, s, res, so, *a, **k: rec.after_update(t2, so))
    wrap_method(Scheduler, "add_request", before=lambda rec, s, req, *a, **k: rec.on_add_request(req))
    wrap_method(Scheduler, "_preempt_request",
                before=lambda rec, s, req, *a, **k: rec.before_preempt(req),
                after=lambda rec, tok, s, res, *a, **k: rec.after_preempt(tok))
    wrap_method(Scheduler, "_free_request", before=lambda rec, s, req, *a, **k: rec.on_free_request(req))
    wrap_method(KVCacheManager, "free",
                before=lambda rec, s, req, *a, **k: rec.before_free_request_blocks(req),
                after=lambda rec, tok, s, *a, **k: setattr(rec, "current_req", -1))
    wrap_method(KVCacheManager, "record_prefix_cache_stats",
                before=lambda rec, s, req, hits, *a, **k: rec.on_prefix_hits(req, hits))
    wrap_method(BlockPool, "get_new_blocks",
                after=lambda rec, tok, s, blocks, *a, **k: rec.after_get_new_blocks(blocks))
    wrap_method(BlockPool, "touch", before=lambda rec, s, blocks, *a, **k: rec.before_touch(blocks),
                after=lambda rec, tok, s, *a, **k: rec.after_touch(tok))
    _wrap_free_blocks(BlockPool)
    wrap_method(BlockPool, "_maybe_evict_cached_block",
                after=lambda rec, tok, s, evicted, block, *a, **k: evicted and rec.on_evicted(block))
    _add_engine_core_methods(EngineCore)
    _add_worker_methods(WorkerWrapperBase)
    _install_env_start(Scheduler, EngineCore)


def _wrap_free_blocks(BlockPool) -> None:
    """``free_blocks`` may get a one-shot iterator: materialise it once, for both."""
    original = BlockPool.free_blocks
    if getattr(original, "__kvprof_original__", None) is not None:
        return

    def free_blocks(self, ordered_blocks, *args, **kwargs):
        rec = ProcessState.recorder
        if rec is None or rec.pool is not self:   # worker recorders live in their own slot
            return original(self, ordered_blocks, *args, **kwargs)
        t = _clock()
        blocks = list(ordered_blocks)   # a one-shot iterator, materialised once for both
        free_before = self.get_num_free_blocks()
        rec.hook_ns += _clock() - t
        result = original(self, blocks, *args, **kwargs)
        t = _clock()
        try:
            if state.FAULT_POINT == "BlockPool.free_blocks" and state.fault_now("BlockPool.free_blocks"):
                raise state.InjectedFault("BlockPool.free_blocks")
            rec.after_free_blocks(free_before, blocks)
        except Exception as exc:
            ProcessState.fail("BlockPool.free_blocks", exc)
        rec.hook_ns += _clock() - t
        return result

    free_blocks.__kvprof_original__ = original
    BlockPool.free_blocks = free_blocks


# --------------------------------------------------------- EngineCore control
def _add_engine_core_methods(EngineCore) -> None:
    """Methods reachable with ``engine_core.call_utility("kvprof_start", ...)``."""

    def kvprof_start(self, path: str, options: dict) -> dict:
        try:
            return start_engine_recorder(self.scheduler, path, options, executor=self.model_executor)
        except KvprofError as exc:   # returned, not raised: no traceback in the engine's log
            return {"error": str(exc), "error_type": type(exc).__name__}

    def kvprof_stop(self) -> dict:
        return stop_engine_recorder(executor=self.model_executor)

    def kvprof_status(self) -> dict:
        """Where tracing stands, after the writers have written what was recorded so far:
        a write error is acted on here (one warning, tracing off), not at a later step."""
        _sync(ProcessState.recorder, ProcessState.fail, "TraceWriter.engine_core")
        rec = ProcessState.recorder
        workers = _worker_statuses(self.model_executor)
        return {**status(), "tracing": rec is not None, "pid": os.getpid(),
                "steps": getattr(rec, "rows_emitted", 0), "workers": workers,
                "warnings_emitted": ProcessState.warnings_emitted}

    EngineCore.kvprof_start = kvprof_start
    EngineCore.kvprof_stop = kvprof_stop
    EngineCore.kvprof_status = kvprof_status
    wrap_method(EngineCore, "shutdown", before=lambda rec, s, *a, **k: stop_engine_recorder(s.model_executor))


def start_engine_recorder(scheduler, path: str, options: dict, executor=None) -> dict:
    from kvprof.hooks.engine import EngineRecorder, Options
    from kvprof.hooks.metadata import run_metadata

    from kvprof.errors import TraceTargetError
    from kvprof.recorder.session import WriterLock, prepare_target, replica_path

    if ProcessState.recorder is not None:
        raise RuntimeError("kvprof is already tracing this engine")
    options = dict(options)
    overwrite = bool(options.pop("overwrite", False))
    opts = Options(**options)
    state.set_fault_point(opts.fault_point or os.environ.get("KVPROF_FAULT"))
    run = run_metadata(scheduler, opts)
    dp_rank, dp_size = data_parallel_rank(scheduler)
    if dp_rank is not None:   # every replica's EngineCore writes a trace of its own
        path = replica_path(path, dp_rank)
        run["data_parallel"] = {"rank": dp_rank, "size": dp_size}
    prepare_target(path, overwrite)     # a second time after the front end's: idempotent
    lock = WriterLock(path)             # no second writer of this trace, in any layout
    workers = []
    try:
        if executor is not None:
            workers = executor.collective_rpc("kvprof_worker_start", args=(path, opts.to_dict()))
        recorder = EngineRecorder(scheduler, path, opts, run)
    except Exception as exc:   # no file can be opened (a full disk): no worker is left recording
        lock.release()
        if executor is not None:
            _stop_workers(executor)
        reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
        raise TraceTargetError(f"cannot write trace {path}: {reason}") from None
    ProcessState.writer_lock = lock     # released once the workers have stopped too
    ProcessState.recorder = recorder
    ProcessState.warned = False
    ProcessState.failed_end = None
    _close_at_exit()
    if opts.py_spy:
        _start_sampler(path, workers, opts.py_spy_rate)
    return {"pid": os.getpid(), "path": path, "worker_pids": workers}


def data_parallel_rank(scheduler) -> tuple[int | None, int | None]:
    """(rank, size) of this EngineCore among data-parallel replicas; (None, None) without DP.

    vLLM reconfigures each replica of a dense model as an independent engine of
    ``data_parallel_size`` 1, keeping its rank in ``data_parallel_index``; the process
    is named ``EngineCore_DP<rank>`` either way. The size is then unknown (None)."""
    import multiprocessing
    parallel = scheduler.vllm_config.parallel_config
    size = int(getattr(parallel, "data_parallel_size", 1) or 1)
    named_dp = multiprocessing.current_process().name.startswith("EngineCore_DP")
    if size <= 1 and not named_dp:
        return None, None
    rank = getattr(parallel, "data_parallel_index", None)
    if rank is None:
        rank = getattr(parallel, "data_parallel_rank", 0)
    return int(rank or 0), (size if size > 1 else None)


_sampler = None   # recorder.pyspy.Sampler while host stacks are sampled


def _start_sampler(path: str, worker_pids: list, rate: int) -> None:
    """py-spy on this process and each worker; where it cannot run, one warning, tracing goes on."""
    global _sampler
    from kvprof.recorder.pyspy import Sampler
    processes = {os.getpid(): "engine_core"}
    for rank, pid in enumerate(worker_pids or []):
        if isinstance(pid, int) and pid not in processes:   # a worker inside the EngineCore: once
            processes[pid] = f"worker-{rank}"
    try:
        _sampler = Sampler(path, processes, rate)
    except Exception as exc:
        log.warning("kvprof: py-spy sampling off: %s; tracing goes on without host stacks", exc)


def _stop_sampler() -> dict | None:
    global _sampler
    sampler, _sampler = _sampler, None
    if sampler is None:
        return None
    try:
        sampler.stop()
        return sampler.write_tables()
    except Exception as exc:
        sampler.kill()
        log.warning("kvprof: py-spy samples not written: %s: %s", type(exc).__name__, exc)
        return {"failed": {"all": f"{type(exc).__name__}: {exc}"}}


_exit_hook_registered = False


def _close_at_exit() -> None:
    """A process that exits (SIGTERM handled, sys.exit) closes its trace files cleanly."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(_close_all)


def _close_all() -> None:
    if _sampler is not None:
        _sampler.kill()
    for name in ("recorder", "worker_recorder"):
        rec = getattr(ProcessState, name)
        setattr(ProcessState, name, None)
        if rec is not None:
            try:
                rec.close()   # everything buffered is written: the trace ends here
            except Exception:
                pass


def stop_engine_recorder(executor=None) -> dict:
    """Close this process's trace; the end record of one a failure closed earlier is returned."""
    host = _stop_sampler()
    rec, ProcessState.recorder = ProcessState.recorder, None
    if rec is not None:
        end = rec.close()
        if end.get("cut_short"):   # the writer failed after the last step's check
            ProcessState.warn_off(f"the trace writer failed: {end['cut_short']}")
    else:
        end = ProcessState.failed_end or {}
    ProcessState.failed_end = None
    if host is not None:
        end = {**end, "py_spy": host}
    if executor is not None:
        workers = _stop_workers(executor)
        if workers is not None:
            end = {**end, "workers": workers}
    _release_writer_lock()
    return end


def _release_writer_lock() -> None:
    lock, ProcessState.writer_lock = ProcessState.writer_lock, None
    if lock is not None:
        lock.release()


def _sync(rec, fail, where: str) -> None:
    """Flush ``rec`` and wait for its writer; a failure goes through ``fail`` as a hook's would."""
    if rec is None:
        return
    try:
        rec.sync()
    except Exception as exc:
        fail(where, exc)


def _worker_statuses(executor) -> list:
    try:
        return list(executor.collective_rpc("kvprof_worker_status", timeout=60))
    except Exception as exc:
        return [{"error": f"{type(exc).__name__}: {exc}"}]


def _stop_workers(executor):
    try:
        return executor.collective_rpc("kvprof_worker_stop", timeout=30)
    except Exception as exc:
        log.warning("kvprof: could not stop worker tracing: %s", exc)
        return None


# ----------------------------------------------------------- worker control
def _add_worker_methods(WorkerWrapperBase) -> None:
    def kvprof_worker_start(self, path: str, options: dict) -> int:
        from kvprof.hooks.worker import WorkerRecorder
        state.set_fault_point(options.get("fault_point") or os.environ.get("KVPROF_FAULT"))
        if _worker_recorder() is None:
            ProcessState.worker_recorder = WorkerRecorder(self, path, options)
            ProcessState.worker_failed_end = None
            _close_at_exit()
        return os.getpid()

    def kvprof_worker_stop(self) -> dict:
        rec, ProcessState.worker_recorder = _worker_recorder(), None
        if rec is None:   # stopped early by a failure: its end record says why
            end, ProcessState.worker_failed_end = ProcessState.worker_failed_end or {}, None
            return end
        end = rec.close()
        if end.get("cut_short"):   # the writer failed after the last forward's check
            _warn_worker_off(f"the trace writer failed: {end['cut_short']}")
        return end

    def kvprof_worker_status(self) -> dict:
        _sync(_worker_recorder(), _fail_worker, "TraceWriter.worker")
        return {"rank": int(getattr(self, "rpc_rank", 0)), "pid": os.getpid(),
                "tracing": _worker_recorder() is not None}

    WorkerWrapperBase.kvprof_worker_start = kvprof_worker_start
    WorkerWrapperBase.kvprof_worker_status = kvprof_worker_status
    WorkerWrapperBase.kvprof_worker_stop = kvprof_worker_stop
    _wrap_forward(WorkerWrapperBase)


def _worker_recorder():
    return ProcessState.worker_recorder


def _wrap_forward(WorkerWrapperBase) -> None:
    """Time ``execute_model`` and, where vLLM calls it, the separate ``sample_tokens``."""
    execute = WorkerWrapperBase.execute_model
    if getattr(execute, "__kvprof_original__", None) is not None:
        return

    def execute_model(self, scheduler_output, *args, **kwargs):
        rec = _worker_recorder()
        if rec is None:
            return execute(self, scheduler_output, *args, **kwargs)
        try:
            if state.FAULT_POINT == "WorkerWrapperBase.execute_model" \
                    and state.fault_now("WorkerWrapperBase.execute_model"):
                raise state.InjectedFault("WorkerWrapperBase.execute_model")
            token = rec.before_forward(scheduler_output)
        except Exception as exc:
            _fail_worker("WorkerWrapperBase.execute_model", exc)
            return execute(self, scheduler_output, *args, **kwargs)
        result = execute(self, scheduler_output, *args, **kwargs)
        try:
            rec.after_forward(token)
        except Exception as exc:
            _fail_worker("WorkerWrapperBase.execute_model", exc)
        return result

    def sample_tokens(self, *args, **kwargs):
        rec, pushed = _worker_recorder(), False
        if rec is not None:
            try:
                pushed = rec.before_sample()
            except Exception as exc:
                _fail_worker("WorkerWrapperBase.sample_tokens", exc)
        result = self.worker.sample_tokens(*args, **kwargs)
        rec = _worker_recorder()
        if rec is not None:
            try:
                if state.FAULT_POINT == "WorkerWrapperBase.sample_tokens" \
                        and state.fault_now("WorkerWrapperBase.sample_tokens"):
                    raise state.InjectedFault("WorkerWrapperBase.sample_tokens")
                rec.after_sample(pushed)
            except Exception as exc:
                _fail_worker("WorkerWrapperBase.sample_tokens", exc)
        return result

    execute_model.__kvprof_original__ = execute
    WorkerWrapperBase.execute_model = execute_model
    if "sample_tokens" not in WorkerWrapperBase.__dict__:
        WorkerWrapperBase.sample_tokens = sample_tokens


def _fail_worker(where: str, exc: BaseException) -> None:
    """Like ProcessState.fail, for this worker's own recorder: the EngineCore keeps recording."""
    rec, ProcessState.worker_recorder = _worker_recorder(), None
    if rec is None:
        return
    cause = state.describe_failure(where, exc)
    _warn_worker_off(cause)
    written_cause = None if isinstance(exc, state.TraceWriteFailed) else cause  # the writer's error is kept
    try:
        ProcessState.worker_failed_end = rec.close(cut_short=written_cause)
    except Exception as close_exc:
        ProcessState.worker_failed_end = {"complete": False, "cut_short": cause,
                                          "close_error": f"{type(close_exc).__name__}: {close_exc}"}


def _warn_worker_off(cause: str) -> None:
    ProcessState.warnings_emitted += 1
    log.warning("kvprof: worker tracing turned off: %s", cause)


# ------------------------------------------------- KVPROF_TRACE: no code change
def _install_env_start(Scheduler, EngineCore) -> None:
    """With KVPROF_TRACE set, recording starts as soon as the EngineCore builds its scheduler.

    The plugin loads inside ``EngineCore.__init__``, so the scheduler's constructor is
    the first kvprof can wrap; the EngineCore (for its executor, to reach the workers)
    is found on the call stack that builds the scheduler."""
    if not os.environ.get(ENV_TRACE):
        return
    original_init = Scheduler.__init__
    if getattr(original_init, "__kvprof_original__", None) is not None:
        return

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        _env_start_engine(self, _calling_instance(EngineCore))

    __init__.__kvprof_original__ = original_init
    Scheduler.__init__ = __init__


def _calling_instance(cls):
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, cls):
            return candidate
        frame = frame.f_back
    return None


def _env_options() -> dict:
    from kvprof.recorder.pyspy import env_enabled
    return {"detail": os.environ.get(ENV_DETAIL, "blocks"), "py_spy": env_enabled()}


def _env_start_engine(scheduler, engine_core) -> None:
    path = os.environ[ENV_TRACE]
    executor = getattr(engine_core, "model_executor", None)
    options = {**_env_options(), "overwrite": os.environ.get(ENV_OVERWRITE) == "1"}
    try:
        start_engine_recorder(scheduler, path, options, executor=executor)
    except Exception as exc:
        log.warning("kvprof: KVPROF_TRACE=%s not recorded: %s", path, exc)
        return
    if executor is None:
        log.warning("kvprof: KVPROF_TRACE: no EngineCore found, forward timings not recorded")
