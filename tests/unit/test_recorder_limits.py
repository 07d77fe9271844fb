"""The recorder's limits, driven through the real EngineRecorder by a scripted engine.

The engine is benchmarks/recorder_memory.py's SyntheticEngine (stand-ins for vLLM's
scheduler objects, the real recorder, session, writer thread and files): requests
decode, finish, free their blocks and are replaced, step after step. Asserted on
the recorder's own structures, never on timing: they stay bounded whatever the run
length; a stalled writer never blocks a step and its drops are counted into the
end record and the trace; a write error (a file-size limit, as a full disk) stops
writing, never raises in submit(), makes the recorder's next flush tell the hook guard
(one warning), and leaves a trace readable up to its last complete batch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from kvprof.format.reader import read_trace
from kvprof.hooks.engine import Options
from kvprof.hooks.state import TraceWriteFailed

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("recorder_memory", ROOT / "benchmarks" / "recorder_memory.py")
synthetic = sys.modules.setdefault("recorder_memory", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(synthetic)

BATCH = 16
FLUSH_ROWS = BATCH * 32          # a request_steps batch every 32 steps
MAX_PENDING = 64                 # TraceSession's default queue length (batches)
TABLES_WRITTEN = ("steps", "request_steps", "requests", "block_events")


class Counting(synthetic.SyntheticEngine):
    """The synthetic engine; like a real one, it lets go of the GIL once a step (the forward)."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, batch=BATCH, options=Options(flush_rows=FLUSH_ROWS), **kwargs)

    def step(self) -> None:
        super().step()
        time.sleep(0)


def produced(engine: Counting) -> dict[str, int]:
    """Rows handed to the recorder, by table (requests: every request gets one row at close).
    Every step schedules the whole batch (arrivals keep it full)."""
    rows = engine.recorder.rows_emitted      # a step whose flush raised has its row, too
    return {"steps": rows, "request_steps": rows * BATCH, "requests": engine.arrived}


def assert_rows_accounted(trace, end: dict, engine: Counting) -> None:
    """Every row produced is on disk or counted as dropped, in the end record and the trace."""
    for table, rows in produced(engine).items():
        on_disk = trace[table].num_rows
        assert on_disk == end["rows_written"].get(table, 0), table
        assert on_disk + end["rows_dropped"].get(table, 0) == rows, table
    assert trace.rows_dropped == end["rows_dropped"]


class HeldIds:
    """The finished ids the index may still hold: those of a request_steps batch that may
    still be built (queued, being built, still buffered). Any other finished id must be gone."""

    def __init__(self, engine: Counting):
        self.engine = engine
        self.largest = 0                      # retired ids of the largest batch taken
        buffer = engine.recorder.req_steps
        take = buffer.take

        def counting_take():
            self.largest = max(self.largest, len(buffer.retired))
            return take()
        buffer.take = counting_take

    def bound(self) -> int:
        """Read before the index: the writer thread only ever lowers the index meanwhile."""
        rec = self.engine.recorder
        queued = list(rec.session.writer._queue.queue)
        pending = sum(len(item[1].retired) for item in queued if item[0] == "request_steps")
        return len(self.engine.scheduler.requests) + len(rec.req_steps.retired) + pending + self.largest


def test_structures_stay_bounded_over_100k_steps(tmp_path):
    engine = Counting(str(tmp_path / "t.arrow"))
    rec, writer = engine.recorder, engine.recorder.session.writer
    held, peak_index = HeldIds(engine), 0
    for _ in range(100_000):
        engine.step()
        assert not rec.in_flight and not rec.finished_pending
        assert len(rec.req_track) == len(engine.scheduler.requests)
        assert len(rec.awaiting_first_token) <= BATCH and not rec.recomputing
        assert len(rec.req_steps) < FLUSH_ROWS + BATCH
        assert writer._queue.qsize() <= MAX_PENDING
        bound = held.bound()
        assert len(rec.req_index) <= bound
        peak_index = max(peak_index, len(rec.req_index))
    assert engine.finished > 10_000 > 20 * peak_index      # the index did not grow with them
    end = engine.close()
    running = set(engine.scheduler.requests)
    if end["rows_dropped"]:    # a lagging writer: the last batch's finished ids may stay behind
        assert running <= set(rec.req_index) <= running | set(rec.req_steps.retired)
    else:
        assert set(rec.req_index) == running
    trace = read_trace(str(tmp_path / "t.arrow"))
    assert_rows_accounted(trace, end, engine)


def stall(writer) -> tuple[threading.Event, threading.Event]:
    """Make this writer's stream writes wait until ``release`` (the disk hangs)."""
    entered, release = threading.Event(), threading.Event()
    write = writer.streams.write

    def stalled(table, batch):
        entered.set()
        release.wait(300)
        write(table, batch)

    writer.streams.write = stalled
    return entered, release


def drained_by(writer, deadline: float) -> None:
    """Wait (no step runs meanwhile, so nothing more is dropped) until the queue is empty."""
    while writer._queue.qsize():
        assert time.monotonic() < deadline, "the writer's queue did not drain"
        time.sleep(0.01)


def run_steps(engine: Counting, n: int) -> None:
    """Steps on their own thread: if a hook blocked on the writer, join() would time out."""
    steps = threading.Thread(target=lambda: [engine.step() for _ in range(n)], daemon=True)
    steps.start()
    steps.join(timeout=300)
    assert not steps.is_alive(), "a step blocked on the stalled writer"


def test_a_stalled_writer_never_blocks_steps_and_drops_are_counted(tmp_path):
    engine = Counting(str(tmp_path / "t.arrow"))
    rec, writer = engine.recorder, engine.recorder.session.writer
    entered, release = stall(writer)
    run_steps(engine, 200)
    assert entered.is_set()
    run_steps(engine, 20_000)
    assert writer._queue.qsize() == MAX_PENDING            # full, and never more
    dropped = dict(writer.stats.rows_dropped)
    assert set(dropped) == set(TABLES_WRITTEN) and dropped["steps"] > 15_000
    # Finished ids of dropped batches left the index; only those a queued batch may need stay.
    assert engine.finished > 2_000
    finished_held = [idx for rid, idx in rec.req_index.items()
                     if rid not in engine.scheduler.requests and rid not in rec.req_steps.retired]
    assert all(idx < rec.req_steps.accepted_seen for idx in finished_held)
    assert len(rec.req_index) < 200
    release.set()
    drained_by(writer, time.monotonic() + 300)   # the disk is back: the queue drains by itself
    run_steps(engine, FLUSH_ROWS // BATCH)       # and the next batches go in, none dropped
    end = engine.close()
    assert end["cut_short"] is None        # the writer closed cleanly, with rows dropped
    assert end["rows_dropped"] == dropped
    assert set(rec.req_index) == set(engine.scheduler.requests)   # handed-back ids left too
    trace = read_trace(str(tmp_path / "t.arrow"))
    assert not trace.complete
    assert trace.rows_dropped == end["rows_dropped"]
    assert f"rows dropped while recording: {trace.rows_dropped}" in trace.warnings
    assert_rows_accounted(trace, end, engine)
    steps = trace["steps"].column("step").to_numpy()
    assert (steps[1:] > steps[:-1]).all()                  # whole batches lost, order kept


def steps_until_the_writer_fails(engine: Counting, timeout_s: float = 120.0):
    """Steps on their own thread until a hook raises (the recorder's cue to the hook guard).
    How many steps that takes depends on when the writer thread gets its turn: step until
    then, with a deadline, rather than a fixed count."""
    raised = []

    def loop():
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                engine.step()
        except Exception as exc:
            raised.append(exc)
    steps = threading.Thread(target=loop, daemon=True)
    steps.start()
    steps.join(timeout=300)
    assert not steps.is_alive()
    return raised[0] if raised else None


def test_a_write_error_stops_the_writer_and_empties_the_index(tmp_path):
    """submit() never raises; the recorder's next flush raises TraceWriteFailed, which the
    hook guard turns into one warning and a close (tests/integration/test_faults.py)."""
    engine = Counting(str(tmp_path / "t.arrow"))
    rec, writer = engine.recorder, engine.recorder.session.writer
    write, calls = writer.streams.write, []

    def failing(table, batch):
        calls.append(table)
        if len(calls) > 20:
            raise OSError(28, "No space left on device")
        write(table, batch)

    writer.streams.write = failing
    error = steps_until_the_writer_fails(engine)
    assert isinstance(error, TraceWriteFailed)
    assert str(error) == "OSError: [Errno 28] No space left on device"
    assert len(calls) == 21                                 # nothing tried after the error
    end = rec.close()                                       # what the guard does next
    assert end["complete"] is False
    assert end["cut_short"] == "OSError: [Errno 28] No space left on device"
    assert set(rec.req_index) == set(engine.scheduler.requests)   # dropped batches' ids left it
    trace = read_trace(str(tmp_path / "t.arrow"))
    assert "the trace was cut short: OSError: [Errno 28] No space left on device" in trace.warnings
    assert_rows_accounted(trace, end, engine)


DISK_FULL = """
import json, logging, resource, sys, time
sys.path.insert(0, {tests!r})
from test_recorder_limits import Counting, produced
from kvprof.hooks.state import ProcessState
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("kvprof").addHandler(handler)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
engine = Counting({path!r})
ProcessState.recorder = engine.recorder
error = None
deadline = time.monotonic() + {timeout_s}
while time.monotonic() < deadline:   # until the writer's error reaches a flush, however late
    try:                     # the hook guard, as around Scheduler.update_from_output
        engine.step()
    except Exception as exc:
        error = repr(exc)
        ProcessState.fail("Scheduler.update_from_output", exc)
        break
print(json.dumps({{"end": ProcessState.failed_end, "warnings": warnings, "error": error,
                  "produced": produced(engine)}}))
"""


def test_a_file_size_limit_cuts_the_trace_cleanly(tmp_path):
    """RLIMIT_FSIZE makes a write fail with EFBIG, as a full disk would, in a subprocess."""
    path = str(tmp_path / "t.arrow")
    code = DISK_FULL.format(tests=str(Path(__file__).parent), limit=64 * 1024, path=path, timeout_s=120)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    end, produced_rows = result["end"], result["produced"]
    assert result["error"].startswith("TraceWriteFailed('OSError: [Errno 27] ")   # from flush, by design
    assert len(result["warnings"]) == 1 and "File too large" in result["warnings"][0]
    assert end["complete"] is False and "File too large" in end["cut_short"]
    sizes = {f: os.path.getsize(os.path.join(path + ".parts", f)) for f in os.listdir(path + ".parts")}
    sizes["main"] = os.path.getsize(path)
    assert max(sizes.values()) == 64 * 1024               # one file reached the limit
    assert sizes["end-engine_core.json"] < 4096           # the end record still fit
    trace = read_trace(path)
    assert f"the trace was cut short: {end['cut_short']}" in trace.warnings
    assert any("cut after" in w and "complete batches" in w for w in trace.warnings)
    assert not trace.complete
    for table, rows in produced_rows.items():              # read up to the last complete batch
        assert trace[table].num_rows == end["rows_written"].get(table, 0), table
        assert trace[table].num_rows + end["rows_dropped"].get(table, 0) == rows, table
    assert 0 < trace["request_steps"].num_rows < produced_rows["request_steps"]
