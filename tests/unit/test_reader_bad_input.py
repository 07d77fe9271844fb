"""Bad inputs for the trace reader and ``kvprof info``.

Every bad file must end in a one-line ``TraceFormatError`` that names the path
(CLI: exit 2, one ``kvprof: error:`` line on stderr, no traceback). A main file
cut after its schema is salvaged: a Trace with the rows of the complete batches
and a warning (CLI: exit 0). The corpus is built from the golden trace in tmp_path.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from kvprof.cli.main import main
from kvprof.errors import NewerFormatError, TraceFormatError
from kvprof.format import schema as S
from kvprof.format.reader import read_trace

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden-1.0" / "trace.arrow"
GOLDEN_PARTS = Path(str(GOLDEN) + ".parts")
GOLDEN_BYTES = GOLDEN.read_bytes()
GOLDEN_STEPS = ipc.open_stream(GOLDEN_BYTES).read_all()
GOLDEN_META = dict(GOLDEN_STEPS.schema.metadata)
BATCH_ROWS = [b.num_rows for b in ipc.open_stream(GOLDEN_BYTES)]


def _message_ends(data: bytes) -> list[int]:
    """Byte offset at which each IPC message (schema, then batches) ends."""
    source = pa.BufferReader(data)
    return [source.tell() for _ in ipc.MessageReader.open_stream(source)]


SCHEMA_END, *BATCH_ENDS = _message_ends(GOLDEN_BYTES)


def rows_before(offset: int) -> int:
    """Steps rows in the batches that lie wholly before ``offset``."""
    return sum(n for n, end in zip(BATCH_ROWS, BATCH_ENDS) if end <= offset)


# ----------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """One read-only-by-convention copy of the golden parts folder, shared by symlink."""
    copy = tmp_path_factory.mktemp("golden") / "trace.arrow.parts"
    shutil.copytree(GOLDEN_PARTS, copy)
    return copy


def place(folder: Path, data: bytes, parts: Path | None = None) -> Path:
    """Write ``data`` as the main file, with the golden parts next to it when given."""
    path = folder / "trace.arrow"
    path.write_bytes(data)
    if parts is not None:
        Path(str(path) + ".parts").symlink_to(parts, target_is_directory=True)
    return path


def own_copy(folder: Path) -> tuple[Path, Path]:
    """A writable copy of the golden trace to damage: (main file, parts folder)."""
    path = folder / "trace.arrow"
    shutil.copyfile(GOLDEN, path)
    shutil.copytree(GOLDEN_PARTS, str(path) + ".parts")
    return path, Path(str(path) + ".parts")


def stream_bytes(table: pa.Table, metadata: dict | None) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema.with_metadata(metadata)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def steps_with_meta(**changes: bytes) -> bytes:
    """The golden steps table with some kvprof.* metadata entries replaced."""
    meta = dict(GOLDEN_META)
    meta.update({f"kvprof.{k}".encode(): v for k, v in changes.items()})
    return stream_bytes(GOLDEN_STEPS, meta)


def assert_cli_refuses(path: Path, message: str, capsys) -> None:
    """`kvprof info`: exit 2, the reader's message as the one line on stderr."""
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"kvprof: error: {message}\n"
    assert "\n" not in message and "Traceback" not in message


def assert_refused(path: Path, fragment: str, capsys, *, named: Path | None = None,
                   kind: type = TraceFormatError) -> None:
    """read_trace raises ``kind`` with one line starting with the path; the CLI agrees."""
    with pytest.raises(TraceFormatError) as info:
        read_trace(str(path))
    message = str(info.value)
    assert type(info.value) is kind
    assert message.startswith(f"{named or path}: ")
    assert fragment in message
    assert_cli_refuses(path, message, capsys)


def read_or_refuse(path: Path, capsys):
    """The contract for damaged bytes: a clean refusal or a Trace; the CLI agrees."""
    try:
        trace = read_trace(str(path))
    except TraceFormatError as exc:
        assert str(exc).startswith(f"{path}: ")
        assert_cli_refuses(path, str(exc), capsys)
        return None
    assert main(["info", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "Traceback" not in out
    return trace


# ------------------------------------------------------- the bad main files
def _parquet(folder: Path) -> bytes:
    pq.write_table(GOLDEN_STEPS, folder / "x.parquet")
    return (folder / "x.parquet").read_bytes()


def _unrelated_stream(folder: Path) -> bytes:
    return stream_bytes(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), None)


def _unrelated_ipc_file(folder: Path) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table({"a": [1, 2, 3]})
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _wrong_type(folder: Path) -> bytes:
    step = GOLDEN_STEPS.column("step").cast(pa.int64())
    table = GOLDEN_STEPS.set_column(0, pa.field("step", pa.int64(), nullable=False), step)
    return stream_bytes(table, GOLDEN_META)


def _missing_column(folder: Path) -> bytes:
    return stream_bytes(GOLDEN_STEPS.drop_columns(["hook_ns"]), GOLDEN_META)


BAD_MAIN_FILES = {  # name: (bytes builder, fragment of the message)
    "empty": (lambda d: b"", "empty file"),
    "random bytes": (lambda d: random.Random(0).randbytes(4096), "not an Arrow IPC file (unknown binary"),
    "csv text": (lambda d: b"step,total_tokens\n0,12\n1,40\n", "not an Arrow IPC file (it looks like text)"),
    "parquet": (_parquet, "not an Arrow IPC file (it is a Parquet file)"),
    "unrelated arrow stream": (_unrelated_stream, "not a kvprof trace (no format version)"),
    "unrelated arrow file": (_unrelated_ipc_file, "not a kvprof trace (no format version)"),
    "stream continuation only": (lambda d: b"\xff\xff\xff\xff", "unreadable Arrow stream"),
    "bad version": (lambda d: steps_with_meta(format_version=b"one"), "bad kvprof format version b'one'"),
    "wrong table": (lambda d: steps_with_meta(table=b"requests"),
                    "holds kvprof table 'requests', expected 'steps'"),
    "wrong column type": (_wrong_type, "column steps.step has type int64, expected int32"),
    "missing column": (_missing_column, "column steps.hook_ns is missing"),
    "run metadata not json": (lambda d: steps_with_meta(run=b"{not json"), "run metadata is not valid JSON"),
}


@pytest.mark.parametrize("case", BAD_MAIN_FILES)
def test_bad_main_file_is_refused_in_one_line(case, tmp_path, parts, capsys):
    build, fragment = BAD_MAIN_FILES[case]
    path = place(tmp_path, build(tmp_path), parts)
    assert_refused(path, fragment, capsys)


def test_newer_major_format_is_refused_naming_the_version(tmp_path, parts, capsys):
    path = place(tmp_path, steps_with_meta(format_version=b"2.0"), parts)
    assert_refused(path, f"written by kvprof format 2.0, newer than this reader ({S.FORMAT_VERSION}); "
                   "upgrade kvprof to read it", capsys, kind=NewerFormatError)


def test_newer_minor_format_with_an_extra_column_is_read(tmp_path, parts):
    extra = GOLDEN_STEPS.append_column("future", pa.array([7] * GOLDEN_STEPS.num_rows))
    path = place(tmp_path, stream_bytes(extra, {**GOLDEN_META, b"kvprof.format_version": b"1.9"}), parts)
    trace = read_trace(str(path))
    assert trace.format_version == "1.9"
    assert trace["steps"].equals(GOLDEN_STEPS.replace_schema_metadata(None))


def test_arrow_ipc_file_of_the_steps_table_is_read(tmp_path, parts):
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, GOLDEN_STEPS.schema) as writer:
        writer.write_table(GOLDEN_STEPS)
    path = place(tmp_path, sink.getvalue().to_pybytes(), parts)
    assert read_trace(str(path))["steps"].num_rows == GOLDEN_STEPS.num_rows


def test_folder_instead_of_file(tmp_path, capsys):
    folder = tmp_path / "trace.arrow"
    folder.mkdir()
    assert_refused(folder, "is a folder, not a trace file", capsys)


def test_missing_path(tmp_path, capsys):
    path = tmp_path / "nowhere.arrow"
    assert_refused(path, "no such file", capsys)


# ------------------------------------------------------- bad part files
def test_part_file_with_text_names_the_part(tmp_path, capsys):
    path, parts = own_copy(tmp_path)
    part = parts / "requests.arrow"
    part.write_text("req,request_id\n0,a\n")
    assert_refused(path, "not an Arrow IPC file (it looks like text)", capsys, named=part)


def test_part_file_holding_another_table(tmp_path, capsys):
    path, parts = own_copy(tmp_path)
    part = parts / "requests.arrow"
    shutil.copyfile(GOLDEN, part)
    assert_refused(path, "holds kvprof table 'steps', expected 'requests'", capsys, named=part)


def test_garbage_forward_file_names_it(tmp_path, capsys):
    path, parts = own_copy(tmp_path)
    forward = parts / "forward-0.arrow"
    forward.write_bytes(random.Random(1).randbytes(500))
    assert_refused(path, "not an Arrow IPC file", capsys, named=forward)


def test_empty_part_file_is_a_warning(tmp_path):
    path, parts = own_copy(tmp_path)
    part = parts / "requests.arrow"
    part.write_bytes(b"")
    trace = read_trace(str(path))
    assert trace["requests"].num_rows == 0
    assert f"requests: missing or empty part file ({part})" in trace.warnings


def test_unparsable_end_record_is_ignored_with_a_warning(tmp_path):
    path, parts = own_copy(tmp_path)
    (parts / "end-engine_core.json").write_text('{"writer": "engine_co')
    trace = read_trace(str(path))
    assert not trace.complete
    assert any("no end record" in w for w in trace.warnings)


def test_end_record_that_is_not_an_object(tmp_path, capsys):
    path, parts = own_copy(tmp_path)
    (parts / "end-engine_core.json").write_text("[]")
    read_or_refuse(path, capsys)


def test_run_metadata_that_is_not_an_object(tmp_path, parts, capsys):
    path = place(tmp_path, steps_with_meta(run=b"42"), parts)
    read_or_refuse(path, capsys)


def test_table_metadata_not_utf8(tmp_path, parts, capsys):
    path = place(tmp_path, steps_with_meta(table=b"st\xffeps"), parts)
    assert_refused(path, "expected 'steps'", capsys)


def test_field_name_not_utf8(tmp_path, parts, capsys):
    data = GOLDEN_BYTES.replace(b"num_running", b"\xffum_running", 1)
    path = place(tmp_path, data, parts)
    read_or_refuse(path, capsys)


# ------------------------------------------------------------ truncation
TRUNCATIONS = range(0, len(GOLDEN_BYTES), 97)


@pytest.mark.parametrize("offset", TRUNCATIONS)
def test_truncated_main_file(offset, tmp_path, parts, capsys):
    path = place(tmp_path, GOLDEN_BYTES[:offset], parts)
    if offset < SCHEMA_END:
        fragment = "empty file" if offset == 0 else "unreadable Arrow stream"
        assert_refused(path, fragment, capsys)
        return
    trace = read_or_refuse(path, capsys)
    assert trace is not None
    assert trace["steps"].num_rows == rows_before(offset) <= GOLDEN_STEPS.num_rows
    batches = sum(end <= offset for end in BATCH_ENDS)  # the zero-row first batch counts
    assert any(w.startswith(f"trace.arrow: cut after {batches} complete batches (")
               for w in trace.warnings)


def test_no_97_byte_truncation_falls_on_a_message_boundary():
    """Keeps the sweep above meaningful: every cut lands inside a message."""
    assert not set(TRUNCATIONS) & set([SCHEMA_END, *BATCH_ENDS])


def test_truncation_at_a_batch_boundary_is_reported(tmp_path, parts):
    offset = BATCH_ENDS[3]
    trace = read_trace(str(place(tmp_path, GOLDEN_BYTES[:offset], parts)))
    assert trace["steps"].num_rows == rows_before(offset) == 41
    assert trace.warnings
    assert not trace.complete


# -------------------------------------------------------------- bit flips
# Offsets (every 97 bytes, bit = offset % 8) whose flip escapes as another exception.
_NOT_IMPLEMENTED = (
    pa.ArrowNotImplementedError,
    "stream._open catches ArrowInvalid/OSError around ipc.open_stream, not ArrowNotImplementedError "
    "(a corrupted schema: 'Integers with more than 64 bits not implemented')")
_MEMORY = (
    pa.ArrowMemoryError,
    "stream._valid_batches catches ArrowInvalid/ArrowIOError/OSError, not "
    "ArrowMemoryError (a corrupted buffer length: 'malloc of size ... failed')")
_VALIDATE = (
    pa.ArrowInvalid,
    "reader.conform's pa.Table.from_arrays(..., schema=) validates the batches and raises "
    "ArrowInvalid ('Buffer #0 too small': a corrupted batch header) outside the salvage loop's try")
KNOWN_BAD_FLIPS: dict[int, tuple[type, str]] = {
    **dict.fromkeys([1843, 2522], _NOT_IMPLEMENTED),
    **dict.fromkeys([5529, 6790, 17654], _MEMORY),
    **dict.fromkeys([5626, 5723, 5820, 5917, 10767, 13968, 16490, 16587, 16684, 16781], _VALIDATE),
}


def _flip_params():
    """Offsets in KNOWN_BAD_FLIPS once escaped as other exceptions; they stay as regressions."""
    for offset in range(0, len(GOLDEN_BYTES), 97):
        yield pytest.param(offset, id=str(offset))


@pytest.mark.parametrize("offset", list(_flip_params()))
def test_bit_flip_in_main_file(offset, tmp_path, parts, capsys):
    data = bytearray(GOLDEN_BYTES)
    data[offset] ^= 1 << (offset % 8)
    read_or_refuse(place(tmp_path, bytes(data), parts), capsys)
