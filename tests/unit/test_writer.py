"""The recorder without vLLM: column buffers, the writer thread, streams, sessions, targets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from kvprof.errors import TraceTargetError
from kvprof.format import schema as S
from kvprof.format.reader import read_stream, read_trace
from kvprof.recorder.columns import ColumnBuffer, RowBuffer
from kvprof.recorder.session import TraceSession, end_record_path, parts_dir, prepare_target
from kvprof.recorder.writer import StreamSet, TraceWriter


def extreme(field: pa.Field):
    """The largest value of the field's type (or a small string / list)."""
    if pa.types.is_string(field.type):
        return "req-0"
    if pa.types.is_list(field.type):
        return [1, 2, 3]
    if pa.types.is_unsigned_integer(field.type):
        return 2 ** field.type.bit_width - 1
    return 2 ** (field.type.bit_width - 1) - 1


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def steps_rows(n: int):
    """A batch builder for ``n`` steps rows (steps 0..n-1), as the hooks hand over."""
    buf = RowBuffer("steps", S.STEPS)
    for i in range(n):
        buf.append((i, *[0] * (len(S.STEPS) - 1)))
    builder, rows = buf.take()
    assert rows == n
    return builder


def empty_rows(table: str):
    return ColumnBuffer(table, S.TABLES[table]).take()[0]


# ------------------------------------------------- ColumnBuffer, RowBuffer
@pytest.mark.parametrize("kind", ["columns", "rows"])
@pytest.mark.parametrize("table", S.TABLES)
def test_buffers_round_trip_extreme_values_with_the_schema_types(table, kind):
    fields = S.TABLES[table]
    row = [extreme(f) for f in fields]
    if kind == "columns":
        buf = ColumnBuffer(table, fields)
        buf.append_row(*row)
        buf.append_row(*row)
    else:
        buf = RowBuffer(table, fields)
        buf.append(tuple(row))
        buf.append(tuple(row))
    builder, rows = buf.take()
    assert rows == 2 and len(buf) == 0
    batch = builder()
    assert batch.schema.equals(pa.schema(fields))
    assert [(f.name, f.type, f.nullable) for f in batch.schema] == \
        [(f.name, f.type, f.nullable) for f in fields]
    assert batch.to_pylist() == [{f.name: v for f, v in zip(fields, row)}] * 2


def test_extend_through_column_attributes():
    buf = ColumnBuffer("block_events", S.BLOCK_EVENTS)
    buf.step.extend([4, 4, 4])
    buf.kind.extend([S.BLOCK_ALLOC, S.BLOCK_FREE, S.BLOCK_EVICT])
    buf.req.extend([-1, 0, 7])
    buf.block_id.extend([10, 11, 12])
    assert len(buf) == 3
    builder, rows = buf.take()
    batch = builder()
    assert rows == 3
    assert batch.column("kind").type == pa.uint8()
    assert batch.column("kind").to_pylist() == [0, 1, 3]
    assert batch.column("req").to_pylist() == [-1, 0, 7]


@pytest.mark.parametrize("kind", ["columns", "rows"])
def test_nullable_columns_accept_none(kind):
    rows = [(0, 0, 100, 200, None, 1 << 30, 5, None, None, None, None),
            (1, 0, 300, 400, 90, 1 << 30, 5, 2 << 30, 10, 20, 30)]
    if kind == "columns":
        buf = ColumnBuffer("forward", S.FORWARD)
        for row in rows:
            buf.append_row(*row)
    else:
        buf = RowBuffer("forward", S.FORWARD)
        for row in rows:
            buf.append(row)
    batch = buf.take()[0]()
    assert batch.schema.equals(pa.schema(S.FORWARD))
    assert batch.column("device_ns").to_pylist() == [None, 90]
    assert batch.column("torch_peak_bytes").to_pylist() == [None, 30]
    assert batch.column("device_ns").null_count == 1


def test_take_hands_over_the_rows_and_leaves_empty_columns():
    buf = ColumnBuffer("preemptions", S.PREEMPTIONS)
    buf.append_row(1, 2, 3, 4, 5, 6)
    old_step = buf.step
    builder, rows = buf.take()
    assert rows == 1 and len(buf) == 0
    assert buf.step is buf.columns[0] and buf.step is not old_step
    buf.append_row(7, 8, 9, 10, 11, 12)                 # after the hand-over: not in the batch
    assert builder().column("step").to_pylist() == [1]
    assert buf.take()[0]().column("step").to_pylist() == [7]


def test_row_buffer_take_rebinds_append():
    buf = RowBuffer("preemptions", S.PREEMPTIONS)
    buf.append((1, 2, 3, 4, 5, 6))
    builder, rows = buf.take()
    buf.append((7, 8, 9, 10, 11, 12))
    assert rows == 1 and len(buf) == 1
    assert builder().column("req").to_pylist() == [3]
    assert buf.take()[0]().column("req").to_pylist() == [9]


def test_empty_buffers_build_empty_batches():
    assert ColumnBuffer("steps", S.STEPS).take()[1] == 0
    builder, rows = RowBuffer("steps", S.STEPS).take()
    assert rows == 0 and builder().schema.equals(pa.schema(S.STEPS)) and builder().num_rows == 0


# ------------------------------------------------------------ TraceWriter
@pytest.fixture
def blocked_write(monkeypatch):
    """StreamSet.write waits until ``release`` is set; ``entered`` says a write has begun."""
    entered, release, written = threading.Event(), threading.Event(), []

    def write(self, table, batch):
        entered.set()
        release.wait(10)
        written.append((table, batch.num_rows))

    monkeypatch.setattr(StreamSet, "write", write)
    yield entered, release, written
    release.set()


def test_full_queue_drops_and_counts_rows_without_blocking(blocked_write):
    entered, release, written = blocked_write
    writer = TraceWriter(StreamSet(), max_pending=1)

    def submit(table: str, rows: int) -> bool:
        builder = steps_rows(rows) if table == "steps" else empty_rows(table)
        start = time.perf_counter()
        ok = writer.submit(table, builder, rows)
        assert time.perf_counter() - start < 0.05
        return ok

    assert submit("steps", 2) is True           # taken by the writer thread, which blocks
    wait_for(entered.is_set)
    assert submit("steps", 3) is True           # fills the one-slot queue
    assert submit("steps", 5) is False
    assert submit("requests", 7) is False
    assert submit("steps", 11) is False
    assert submit("requests", 0) is True        # nothing to hand over
    assert writer.stats.rows_dropped == {"steps": 16, "requests": 7}
    release.set()
    stats = writer.close()
    assert written == [("steps", 2), ("steps", 3)]
    assert stats.rows_written == {"steps": 5}
    assert stats.batches_written == 2
    assert stats.rows_dropped == {"steps": 16, "requests": 7}
    assert stats.error is None


def test_write_error_is_recorded_and_later_batches_are_dropped(monkeypatch):
    def write(self, table, batch):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StreamSet, "write", write)
    writer = TraceWriter(StreamSet())
    assert writer.submit("steps", steps_rows(3), 3) is True
    wait_for(lambda: writer.stats.error is not None)
    assert writer.stats.error == "OSError: [Errno 28] No space left on device"
    assert writer.submit("steps", steps_rows(4), 4) is False
    stats = writer.close()
    assert stats.rows_dropped == {"steps": 7}
    assert stats.rows_written == {} and stats.batches_written == 0


def test_a_row_that_does_not_fit_its_type_stops_the_writer():
    rows = RowBuffer("preemptions", S.PREEMPTIONS)
    rows.append((0, 1, 2, 2 ** 31, 0, 0))           # computed_tokens is int32
    writer = TraceWriter(StreamSet())
    assert writer.submit("preemptions", *rows.take()) is True
    stats = writer.close()
    assert stats.error.startswith("OverflowError: Python integer 2147483648 out of bounds for int32")
    assert stats.rows_dropped == {"preemptions": 1} and stats.rows_written == {}


def test_close_returns_within_its_timeout_when_the_writer_is_stuck(blocked_write):
    entered, release, _ = blocked_write
    writer = TraceWriter(StreamSet(), max_pending=1)
    writer.submit("steps", steps_rows(1), 1)
    wait_for(entered.is_set)
    writer.submit("steps", steps_rows(1), 1)   # the queue is now full
    closer = threading.Thread(target=writer.close, kwargs={"timeout": 0.2}, daemon=True)
    closer.start()
    closer.join(1.0)
    stuck = closer.is_alive()
    release.set()
    closer.join(5.0)
    assert not stuck


# -------------------------------------------------------------- StreamSet
def test_open_stream_is_readable_before_any_batch_and_before_close(tmp_path):
    path = str(tmp_path / "trace.arrow")
    streams = StreamSet()
    streams.open("steps", path, S.schema_for("steps", writer="engine_core", run_json='{"a": 1}'))
    try:
        warnings: list[str] = []
        table, meta = read_stream(path, "steps", warnings)
        assert table.num_rows == 0 and warnings == []
        assert meta[S.META_FORMAT] == S.FORMAT_VERSION.encode()
        assert meta[S.META_TABLE] == b"steps"
        assert meta[S.META_RUN] == b'{"a": 1}'
        streams.write("steps", steps_rows(3)())
        table, _ = read_stream(path, "steps", warnings)
        assert table.column("step").to_pylist() == [0, 1, 2] and warnings == []
        assert ipc.open_stream(path).read_all().num_rows == 3
    finally:
        streams.close()


def test_stream_of_a_killed_process_is_readable(tmp_path):
    path = str(tmp_path / "trace.arrow")
    code = f"""
import os, signal
from kvprof.format import schema as S
from kvprof.recorder.writer import StreamSet
from kvprof.recorder.columns import ColumnBuffer
buf = ColumnBuffer("steps", S.STEPS)
for i in range(4):
    buf.append_row(i, *[0] * (len(S.STEPS) - 1))
streams = StreamSet()
streams.open("steps", {path!r}, S.schema_for("steps", writer="engine_core"))
streams.write("steps", buf.take()[0]())
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    trace = read_trace(path)
    assert trace["steps"].column("step").to_pylist() == [0, 1, 2, 3]
    assert trace.format_version == S.FORMAT_VERSION
    assert not trace.complete
    assert any("no end record" in w for w in trace.warnings)


# ----------------------------------------------------------- TraceSession
def new_session(tmp_path, run: dict | None = None) -> tuple[str, TraceSession]:
    path = str(tmp_path / "trace.arrow")
    prepare_target(path, overwrite=False)
    tables = {"steps": path,
              "requests": os.path.join(parts_dir(path), S.PART_FILES["requests"])}
    return path, TraceSession(path, tables, "engine_core", run or {"vllm_version": "0.32.0"})


def test_session_close_writes_the_end_record(tmp_path):
    path, session = new_session(tmp_path)
    session.writer.submit("steps", steps_rows(2), 2)
    requests = RowBuffer("requests", S.REQUESTS)
    requests.append(tuple(extreme(f) for f in S.REQUESTS))
    session.writer.submit("requests", *requests.take())
    record = session.close()
    with open(end_record_path(path, "engine_core")) as f:
        assert json.load(f) == record
    assert record["writer"] == "engine_core" and record["pid"] == os.getpid()
    assert record["complete"] is True and record["cut_short"] is None
    assert record["rows_written"] == {"steps": 2, "requests": 1}
    assert record["rows_dropped"] == {}
    assert record["started_ns"] <= record["stopped_ns"]
    assert session.close() == {}
    trace = read_trace(path)
    assert trace.complete and trace.run == {"vllm_version": "0.32.0", "workers": []}
    assert trace["steps"].num_rows == 2 and trace["requests"].num_rows == 1


def test_session_cut_short_is_not_complete(tmp_path):
    path, session = new_session(tmp_path)
    record = session.close(cut_short="engine shut down while tracing")
    assert record["complete"] is False
    assert record["cut_short"] == "engine shut down while tracing"
    assert "the trace was cut short: engine shut down while tracing" in read_trace(path).warnings


def test_session_write_error_is_in_the_end_record(tmp_path, monkeypatch):
    def write(self, table, batch):
        raise OSError(28, "No space left on device")

    path, session = new_session(tmp_path)
    monkeypatch.setattr(StreamSet, "write", write)
    session.writer.submit("steps", steps_rows(3), 3)
    wait_for(lambda: session.writer.stats.error is not None)
    session.writer.submit("steps", steps_rows(2), 2)
    record = session.close()
    assert record["complete"] is False
    assert record["cut_short"] == "OSError: [Errno 28] No space left on device"
    assert record["rows_dropped"] == {"steps": 5} and record["rows_written"] == {}
    assert read_trace(path).rows_dropped == {"steps": 5}


# ---------------------------------------------------------- prepare_target
def test_prepare_target_refuses_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "trace.arrow"
    path.write_bytes(b"old")
    (tmp_path / "trace.arrow.parts").mkdir()
    (tmp_path / "trace.arrow.parts" / "end-old.json").write_text("{}")
    with pytest.raises(TraceTargetError, match="exists; pass overwrite=True to replace it"):
        prepare_target(str(path), overwrite=False)
    assert path.read_bytes() == b"old"
    prepare_target(str(path), overwrite=True)
    assert not path.exists()
    assert os.listdir(tmp_path / "trace.arrow.parts") == []


def test_prepare_target_refuses_a_missing_folder(tmp_path):
    path = tmp_path / "missing" / "trace.arrow"
    with pytest.raises(TraceTargetError, match=f"folder {tmp_path / 'missing'} does not exist"):
        prepare_target(str(path), overwrite=True)


def test_prepare_target_refuses_an_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is still writable")
        with pytest.raises(TraceTargetError, match=f"folder {folder} is not writable"):
            prepare_target(str(folder / "trace.arrow"), overwrite=True)
    finally:
        folder.chmod(0o700)


def test_prepare_target_refuses_a_folder_as_the_trace_path(tmp_path):
    (tmp_path / "trace.arrow").mkdir()
    with pytest.raises(TraceTargetError):
        prepare_target(str(tmp_path / "trace.arrow"), overwrite=True)
