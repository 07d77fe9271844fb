"""Faults inside kvprof, and disk trouble, on one real engine: the engine's results never change.

One engine serves the whole file; each case starts and stops its own trace on it.
Its processes' stdout and stderr go to a pipe read here, so each test sees exactly
the lines a user would see in the terminal.
"""
from __future__ import annotations

import os
import resource
import threading
import time

import pytest

import kvprof
from kvprof.format.reader import read_trace

from .checks import block_identity, token_identity

pytestmark = pytest.mark.engine

# Flushes by row count, never by time, so that every machine, fast or slow, flushes the same
# batches: a writer fault named "@3" always lands mid-run, with batches before and after it.
FLUSH = {"flush_interval_s": 3600.0, "flush_rows": 16}


class EngineOutput:
    """Lines the engine's processes print, collected by a thread (a pipe: no file-size limit)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.lines: list[str] = []
        self._file = os.fdopen(read_fd, "r", errors="replace")
        self._write_fd = write_fd   # our own end of the pipe, for sync markers
        self._markers = 0
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self._file:
            self.lines.append(line.rstrip("\n"))

    def mark(self) -> int:
        return len(self.lines)

    def sync(self, timeout: float = 120.0) -> None:
        """Wait until the reader has every line written to the pipe before this call.

        A kvprof warning is written by the engine's process before the utility call that
        caused it returns; a marker written now comes after it in the pipe, so once the
        marker is read, so is the warning, however slow the reader thread was."""
        self._markers += 1
        marker = f"kvprof-test-sync {self._markers}"
        os.write(self._write_fd, (marker + "\n").encode())
        deadline = time.monotonic() + timeout
        while marker not in self.lines[-50:]:
            assert time.monotonic() < deadline, "the pipe reader never caught up"
            time.sleep(0.01)

    def kvprof_lines(self, since: int) -> list[str]:
        """kvprof's lines since the mark; a traceback there (an exception that reached vLLM's
        logging) is a failure on its own."""
        self.sync()
        printed = [line for line in self.lines[since:] if not line.startswith("kvprof-test-sync")]
        assert not any("Traceback" in line for line in printed), "\n".join(printed)
        return [line for line in printed if "kvprof: " in line]


def _start_engine_printing_to(write_fd: int):
    """The engine's processes inherit stdout and stderr: point both at the pipe while it starts."""
    from kvprof.models.engine import make_llm
    saved = os.dup(1), os.dup(2)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    try:
        return make_llm(max_num_seqs=16, num_kv_blocks=20, enforce_eager=True)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@pytest.fixture(scope="module")
def served():
    """The engine (a KV pool of 20 blocks: the workload preempts, evicts and hits the prefix
    cache, so every hook runs), its printed lines, and untraced reference outputs."""
    from kvprof.models.workload import make_workload
    read_fd, write_fd = os.pipe()
    output = EngineOutput(read_fd, write_fd)
    llm = _start_engine_printing_to(write_fd)
    workload = make_workload(16, max_tokens=48, seed=0, length_scale=0.1)
    served = {"llm": llm, "output": output, "workload": workload}
    served["reference"] = _tokens(_generate(served))
    yield served
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


def _generate(served, n: int | None = None):
    wl = served["workload"]
    served["llm"].reset_prefix_cache()
    prompts = wl.prompts()[:n] if n else wl.prompts()
    return served["llm"].generate(prompts, wl.sampling_params(), use_tqdm=False)


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def _traced_run(served, path, **options):
    """One traced pass of the workload: outputs, the handle, the status while still tracing,
    and the kvprof lines the engine printed meanwhile."""
    since = served["output"].mark()
    handle = kvprof.trace(served["llm"], path, **FLUSH, **options)
    with handle:
        before = handle.status()
        outputs = _generate(served)
        status = handle.status()
    status["new_warnings"] = status["warnings_emitted"] - before["warnings_emitted"]
    return outputs, handle, status, served["output"].kvprof_lines(since)


# ------------------------------------------------------------------ hook faults
# fault point (hook name @ calls let pass first), the recorder it stops, rows on disk
ENGINE, WORKER = "engine_core", "worker-0"
FAULTS = [
    ("Scheduler.schedule@10", ENGINE, {"steps": 10}),
    ("Scheduler.update_from_output@10", ENGINE, {"steps": 10}),
    ("Scheduler.add_request@8", ENGINE, {}),
    ("Scheduler._preempt_request@1", ENGINE, {"preemptions": 1}),
    ("Scheduler._free_request@4", ENGINE, {}),
    ("KVCacheManager.free@4", ENGINE, {}),
    ("KVCacheManager.record_prefix_cache_stats@8", ENGINE, {}),
    ("BlockPool.get_new_blocks@10", ENGINE, {}),
    ("BlockPool.touch@1", ENGINE, {}),
    ("BlockPool.free_blocks@10", ENGINE, {}),
    ("BlockPool._maybe_evict_cached_block@10", ENGINE, {}),
    ("TraceWriter.engine_core@3", ENGINE, {}),
    ("WorkerWrapperBase.execute_model@10", WORKER, {"forward": 10}),
    ("WorkerWrapperBase.sample_tokens@10", WORKER, {"forward": 11}),
    ("TraceWriter.worker@3", WORKER, {}),
]


def _expected_warning(hook: str, side: str) -> str:
    who = "tracing" if side == ENGINE else "worker tracing"
    if hook.startswith("TraceWriter."):
        return f"kvprof: {who} turned off: the trace writer failed: InjectedFault: {hook}"
    return f"kvprof: {who} turned off: hook {hook} failed: InjectedFault: {hook}"


def _expected_cut(hook: str) -> str:
    """The end record keeps the writer's own error; a hook's failure is named."""
    if hook.startswith("TraceWriter."):
        return f"InjectedFault: {hook}"
    return f"hook {hook} failed: InjectedFault: {hook}"


@pytest.mark.parametrize("fault,side,rows", FAULTS, ids=[f[0].split("@")[0] for f in FAULTS])
def test_fault_in_kvprof_leaves_the_engine_alone(served, tmp_path, fault, side, rows):
    hook = fault.split("@")[0]
    path = tmp_path / "fault.arrow"
    outputs, handle, status, lines = _traced_run(served, path, _fault_point=fault)

    # The engine's results are those of the untraced run.
    assert _tokens(outputs) == served["reference"]
    # Exactly one warning, printed by the process whose recorder stopped.
    assert len(lines) == 1 and lines[0].endswith(_expected_warning(hook, side)), lines
    # Only that recorder stopped; stop() returns why.
    summary = handle.summary
    worker_end = summary["workers"][0]
    assert [w["tracing"] for w in status["workers"]] == [side == ENGINE]
    if side == ENGINE:
        assert status["tracing"] is False and status["new_warnings"] == 1
        assert summary["complete"] is False and summary["cut_short"] == _expected_cut(hook)
        assert worker_end["complete"] is True
    else:
        assert status["tracing"] is True and status["new_warnings"] == 0
        assert summary["complete"] is True
        assert worker_end["complete"] is False and worker_end["cut_short"] == _expected_cut(hook)

    # The trace up to the fault reads, and says it was cut short.
    trace = read_trace(path)
    assert not trace.complete and not trace.truncated
    said = (f"the trace was cut short: {_expected_cut(hook)}" if side == ENGINE
            else f"worker-0 stopped recording early: {_expected_cut(hook)}")
    assert said in trace.warnings
    steps = trace["steps"].to_pandas()
    assert steps.step.tolist() == list(range(len(steps)))   # no hole: every row up to the cut
    assert trace.end_records[ENGINE]["rows_written"].get("steps", 0) == len(steps)
    for table, n in rows.items():
        assert trace[table].num_rows == n, table
    if hook.startswith("TraceWriter."):
        assert trace.rows_dropped, "the batches after the writer's fault are counted as dropped"
    else:
        assert trace.rows_dropped == {}
    assert block_identity(trace) == []
    assert token_identity(_with_request_rows(trace)) == {}


@pytest.mark.parametrize("hook,side", [("TraceWriter.engine_core", ENGINE), ("TraceWriter.worker", WORKER)])
def test_a_writer_failure_first_seen_at_stop_warns_once_and_cuts_the_trace(served, tmp_path, hook, side):
    """A run shorter than any flush interval, with no status call: the first batch is written
    at the engine's idle flush or at stop, the write fails, and stop() is the first to know."""
    path = tmp_path / "short.arrow"
    since = served["output"].mark()
    with kvprof.trace(served["llm"], path, _fault_point=f"{hook}@0") as handle:   # default flushes
        outputs = _generate(served, n=1)
    lines = served["output"].kvprof_lines(since)
    assert _tokens(outputs) == served["reference"][:1]
    assert len(lines) == 1 and lines[0].endswith(_expected_warning(hook, side)), lines
    end = handle.summary if side == ENGINE else handle.summary["workers"][0]
    other = handle.summary["workers"][0] if side == ENGINE else handle.summary
    assert end["complete"] is False and end["cut_short"] == _expected_cut(hook)
    assert other["complete"] is True
    trace = read_trace(path)
    assert not trace.complete and trace.rows_dropped
    said = (f"the trace was cut short: {_expected_cut(hook)}" if side == ENGINE
            else f"worker-0 stopped recording early: {_expected_cut(hook)}")
    assert said in trace.warnings


class _with_request_rows:
    """A cut trace holds request_steps of requests that never got their row (they had not
    finished at the cut): the token identity is checked on the others."""

    def __init__(self, trace):
        import pyarrow.compute as pc
        known = trace["requests"].column("req")
        self.tables = {name: trace[name].filter(pc.is_in(trace[name].column("req"), known))
                       for name in ("request_steps", "preemptions")}
        self.tables["requests"] = trace["requests"]

    def __getitem__(self, table):
        return self.tables[table]


def test_tracing_works_again_after_a_fault(served, tmp_path):
    """start / fault / stop, then start / stop on the same engine: a complete trace."""
    _, _, status, lines = _traced_run(served, tmp_path / "fault.arrow",
                                      _fault_point="Scheduler.schedule@5")
    assert status["tracing"] is False and len(lines) == 1
    path = tmp_path / "again.arrow"
    outputs, handle, status, lines = _traced_run(served, path)
    assert _tokens(outputs) == served["reference"]
    assert status["tracing"] is True and lines == []
    trace = read_trace(path)
    assert trace.complete and trace.warnings == []
    assert trace["steps"].num_rows == handle.summary["steps"]
    assert trace["requests"].num_rows == len(served["reference"])
    assert set(trace["steps"].to_pandas().step) <= set(trace["forward"].to_pandas().step)
    assert block_identity(trace) == [] and token_identity(trace) == {}


# ---------------------------------------------------------------- disk trouble
def test_unwritable_target_fails_at_start_and_the_engine_serves_on(served, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    missing = tmp_path / "no" / "such" / "folder"
    for path, reason in [(a_file / "t.arrow", "does not exist"), (missing / "t.arrow", "does not exist")]:
        with pytest.raises(kvprof.TraceTargetError, match=reason):
            kvprof.trace(served["llm"], path).start()
    assert not (tmp_path / "no").exists()   # trace() creates no folder
    assert a_file.read_text() == "not a folder"
    assert _tokens(_generate(served)) == served["reference"]


def test_existing_trace_is_kept_unless_overwrite(served, tmp_path):
    path = tmp_path / "t.arrow"
    path.write_bytes(b"keep me")
    with pytest.raises(kvprof.TraceTargetError, match="exists"):
        kvprof.trace(served["llm"], path).start()
    assert path.read_bytes() == b"keep me"
    leftover = tmp_path / "old.arrow.parts"     # only the parts folder of an earlier trace is left
    leftover.mkdir()
    (leftover / "requests.arrow").write_bytes(b"keep me too")
    with pytest.raises(kvprof.TraceTargetError, match="exists"):
        kvprof.trace(served["llm"], tmp_path / "old.arrow").start()
    assert (leftover / "requests.arrow").read_bytes() == b"keep me too"
    with kvprof.trace(served["llm"], path, overwrite=True):
        outputs = _generate(served, n=4)
    assert _tokens(outputs) == served["reference"][:4]
    trace = read_trace(path)
    assert trace.complete and trace["requests"].num_rows == 4


class _FileSizeLimit:
    """RLIMIT_FSIZE on a running process (vLLM cannot start under a small one: its shared-memory
    queues are files). Python ignores SIGXFSZ, so a write past the limit fails with EFBIG."""

    def __init__(self, pid: int, limit: int):
        self.pid, self.limit = pid, limit

    def __enter__(self):
        self.saved = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))
        return self

    def __exit__(self, *exc):
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, self.saved)


DISK_LIMIT = 24 * 1024   # bytes per file: the EngineCore's files pass it a few batches into the run


def test_disk_full_mid_run_stops_tracing_cleanly(served, tmp_path):
    path = tmp_path / "full.arrow"
    since = served["output"].mark()
    handle = kvprof.trace(served["llm"], path, **FLUSH).start()
    try:
        with _FileSizeLimit(handle.started["pid"], DISK_LIMIT):
            outputs = _generate(served)
            status = handle.status()
    finally:
        summary = handle.stop()
    lines = served["output"].kvprof_lines(since)
    assert _tokens(outputs) == served["reference"]
    assert len(lines) == 1 and "kvprof: tracing turned off: the trace writer failed: OSError" in lines[0]
    assert "File too large" in lines[0], lines
    assert status["tracing"] is False
    assert summary["complete"] is False and "File too large" in summary["cut_short"]
    assert summary["workers"][0]["complete"] is True   # the worker's files were not limited

    trace = read_trace(path)
    assert not trace.complete and trace.rows_dropped
    assert any("File too large" in w for w in trace.warnings)
    engine_files = [path, *(tmp_path / "full.arrow.parts").glob("*.arrow")]
    sizes = {f.name: f.stat().st_size for f in engine_files if not f.name.startswith("forward-")}
    assert max(sizes.values()) == DISK_LIMIT, sizes   # an EngineCore file was cut at the limit ...
    cut = [w for w in trace.warnings if "complete batches" in w]
    assert cut, trace.warnings                        # ... and read up to its last whole batch
    steps = trace["steps"].to_pandas()
    assert 0 < len(steps) < summary["steps"]
    assert steps.step.tolist() == list(range(len(steps)))
    assert block_identity(trace) == []
    # The engine still traces normally once the disk has room again.
    outputs, _, status, lines = _traced_run(served, tmp_path / "after.arrow")
    assert _tokens(outputs) == served["reference"] and lines == [] and status["tracing"]
    assert read_trace(tmp_path / "after.arrow").complete


def test_disk_full_at_start_fails_cleanly_and_leaves_no_worker_recording(served, tmp_path):
    path = tmp_path / "nospace.arrow"
    engine_core_pid = kvprof.trace(served["llm"], path).status()["pid"]   # status() starts nothing
    since = served["output"].mark()
    with _FileSizeLimit(engine_core_pid, 0):
        with pytest.raises(kvprof.TraceTargetError, match="cannot write trace"):
            kvprof.trace(served["llm"], path).start()
    assert served["output"].kvprof_lines(since) == []   # an error to the caller, not a log line
    worker_end = read_trace_end(path, WORKER)
    assert worker_end["complete"] is True                  # the worker was told to stop at once
    assert worker_end["rows_written"] == {}
    after = tmp_path / "after.arrow"
    with kvprof.trace(served["llm"], after):
        outputs = _generate(served)
    assert _tokens(outputs) == served["reference"]
    trace = read_trace(after)
    assert trace.complete
    assert set(trace["steps"].to_pandas().step) <= set(trace["forward"].to_pandas().step)


def read_trace_end(path, writer: str) -> dict:
    import json
    with open(f"{path}.parts/end-{writer}.json") as f:
        return json.load(f)
