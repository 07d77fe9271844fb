"""Reading a kvprof trace: the main stream, its parts folder, salvage of cut files.

Every way a file can be wrong ends in a ``TraceFormatError`` with one line that
names the problem; a stream cut short (a crash, a full disk) is read up to its
last complete record batch and the cut is reported in ``Trace.warnings``.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.ipc as ipc

from kvprof.errors import NewerFormatError, TraceFormatError
from kvprof.format import schema as S

_FILE_MAGIC = b"ARROW1"
_STREAM_CONTINUATION = b"\xff\xff\xff\xff"


@dataclass
class Trace:
    """A trace in memory: one Arrow table per kvprof table, plus what is known about it."""

    path: str
    format_version: str
    run: dict
    tables: dict[str, pa.Table]
    end_records: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False

    def __getitem__(self, table: str) -> pa.Table:
        return self.tables[table]

    @property
    def complete(self) -> bool:
        """True when every writer closed its files cleanly and nothing was dropped."""
        ends = self.end_records
        return not self.truncated and "engine_core" in ends and all(
            e.get("complete") and not e.get("rows_dropped") for e in ends.values())

    @property
    def rows_dropped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for end in self.end_records.values():
            for table, n in row_counts(end.get("rows_dropped")).items():
                total[table] = total.get(table, 0) + n
        return total


def read_trace(path: str, tables: tuple[str, ...] | None = None) -> Trace:
    """Read the trace at ``path`` (the main file the user named)."""
    path = os.fspath(path)
    warnings: list[str] = []
    _refuse_replica_set(path)
    steps, meta = read_stream(path, "steps", warnings)
    version = meta.get(S.META_FORMAT, b"").decode()
    run = _checked_run(_run_metadata(meta, path), warnings)
    wanted = tables or tuple(t for t in S.TABLES if t != "steps")
    loaded = {"steps": steps}
    parts = path + S.PARTS_SUFFIX
    for table in wanted:
        if table == "forward":
            loaded["forward"], run["workers"] = _read_forward(parts, warnings)
        elif table != "steps":
            part = os.path.join(parts, S.PART_FILES[table])
            if os.path.exists(part) and os.path.getsize(part) > 0:
                loaded[table] = read_stream(part, table, warnings)[0]
            elif table in S.OPTIONAL_TABLES:   # an older minor version, or not recorded
                loaded[table] = empty_table(table)
            else:
                warnings.append(f"{table}: missing or empty part file ({part})")
                loaded[table] = empty_table(table)
    trace = Trace(path, version, run, loaded, _end_records(parts), warnings)
    if not trace.end_records.get("engine_core"):
        warnings.append("the trace has no end record: the engine stopped before tracing "
                        "did (crash or kill); read up to the last flushed batch")
    elif trace.end_records["engine_core"].get("cut_short"):
        warnings.append(f"the trace was cut short: {trace.end_records['engine_core']['cut_short']}")
    for writer, end in sorted(trace.end_records.items()):
        if writer != "engine_core" and end.get("cut_short"):   # a worker stopped recording early
            warnings.append(f"{writer} stopped recording early: {end['cut_short']}")
    if trace.rows_dropped:
        warnings.append(f"rows dropped while recording: {trace.rows_dropped}")
    _check_rows_written(trace)
    return trace


def _check_rows_written(trace: Trace) -> None:
    """A file cut exactly between batches reads cleanly: the end records tell."""
    written: dict[str, int] = {}
    for end in trace.end_records.values():
        for table, rows in row_counts(end.get("rows_written")).items():
            written[table] = written.get(table, 0) + rows
    for table, rows in written.items():
        if table in trace.tables and trace.tables[table].num_rows < rows:
            trace.truncated = True
            trace.warnings.append(f"{table}: {trace.tables[table].num_rows} rows on disk, "
                                  f"{rows} written: the file was cut")
    forward = trace.tables.get("forward")
    if forward is not None and forward.num_rows:
        ranks = set(forward.column("rank").to_pylist())
        missing = sorted(r for r in ranks if f"worker-{r}" not in trace.end_records)
        if missing:
            trace.truncated = True
            trace.warnings.append(f"no end record from worker(s) {missing}: their last rows may be lost")


def replica_traces(path: str) -> list[str]:
    """The traces that data-parallel replicas wrote for the path the user named
    (``serve.arrow`` → ``serve.dp0.arrow``, ``serve.dp1.arrow``, ...)."""
    import glob
    import re
    stem, ext = os.path.splitext(path)
    pattern = re.compile(re.escape(stem) + r"\.dp(\d+)" + re.escape(ext or ".arrow") + "$")
    found = [(int(m.group(1)), p) for p in glob.glob(glob.escape(stem) + ".dp*" + (ext or ".arrow"))
             if (m := pattern.match(p))]
    return [p for _, p in sorted(found)]


def _refuse_replica_set(path: str) -> None:
    if not os.path.exists(path):
        replicas = replica_traces(path)
        if replicas:
            raise TraceFormatError(
                f"{path}: no such file; a data-parallel deployment wrote one trace per replica: "
                f"{', '.join(replicas)} (read each)")


def read_stream(path: str, table: str, warnings: list[str]) -> tuple[pa.Table, dict]:
    """One kvprof stream: checked against the schema, salvaged up to a cut."""
    data = _read_bytes(path)
    reader = _open(data, path)
    meta = dict(reader.schema.metadata or {})
    check_metadata(meta, path, table)
    batches = []
    try:
        for batch in reader:
            batch.validate(full=True)
            batches.append(batch)
    except (pa.ArrowException, OSError) as exc:
        warnings.append(f"{os.path.basename(path)}: cut after {len(batches)} complete batches ({_first_line(exc)})")
    try:
        result = pa.Table.from_batches(batches, schema=reader.schema) if batches else \
            reader.schema.empty_table()
        return conform(result, table, path), meta
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"{path}: unreadable table {table} ({_first_line(exc)})") from None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TraceFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceFormatError(f"{path}: is a folder, not a trace file") from None
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise TraceFormatError(f"{path}: empty file")
    return data


def _open(data: bytes, path: str):
    """An IPC stream, or an IPC file (read as the stream after its 8-byte preamble)."""
    buf = pa.py_buffer(data)
    if data[:6] == _FILE_MAGIC:
        try:
            return _FileBatches(ipc.open_file(buf))
        except (pa.ArrowException, OSError):
            buf = pa.py_buffer(data[8:])
    elif not data.startswith(_STREAM_CONTINUATION):
        raise TraceFormatError(f"{path}: not an Arrow IPC file ({_describe(data)})")
    try:
        reader = ipc.open_stream(buf)
    except (pa.ArrowException, OSError) as exc:
        raise TraceFormatError(f"{path}: unreadable Arrow stream ({_first_line(exc)})") from None
    return _StreamBatches(reader)


class _StreamBatches:
    """Uniform iteration over stream and file readers."""

    def __init__(self, reader):
        self.reader = reader
        self.schema = reader.schema

    def __iter__(self):
        while True:
            try:
                yield self.reader.read_next_batch()
            except StopIteration:
                return


class _FileBatches:
    def __init__(self, reader):
        self.reader = reader
        self.schema = reader.schema

    def __iter__(self):
        for i in range(self.reader.num_record_batches):
            yield self.reader.get_batch(i)


def check_metadata(meta: dict, path: str, table: str) -> None:
    version = meta.get(S.META_FORMAT)
    if version is None:
        raise TraceFormatError(f"{path}: an Arrow file, but not a kvprof trace (no format version)")
    try:
        major = int(version.decode().split(".")[0])
    except (ValueError, UnicodeDecodeError):
        raise TraceFormatError(f"{path}: bad kvprof format version {version!r}") from None
    if major > S.FORMAT_MAJOR:
        raise NewerFormatError(
            f"{path}: written by kvprof format {version.decode(errors='replace')}, newer than this reader "
            f"({S.FORMAT_VERSION}); upgrade kvprof to read it")
    found = meta.get(S.META_TABLE, b"").decode("utf-8", "replace")
    if found != table:
        raise TraceFormatError(f"{path}: holds kvprof table {found!r}, expected {table!r}")


def conform(tbl: pa.Table, table: str, path: str) -> pa.Table:
    """Columns in schema order with the schema's types; extra (newer minor) columns dropped."""
    columns = []
    for f in S.TABLES[table]:
        if f.name not in tbl.column_names:
            if f.name in S.ADDED_COLUMNS.get(table, {}):   # an older minor version: null
                columns.append(pa.nulls(tbl.num_rows, f.type))
                continue
            raise TraceFormatError(f"{path}: column {table}.{f.name} is missing")
        col = tbl.column(f.name)
        if col.type != f.type:
            raise TraceFormatError(
                f"{path}: column {table}.{f.name} has type {col.type}, expected {f.type}")
        if col.null_count and not f.nullable:
            raise TraceFormatError(
                f"{path}: column {table}.{f.name} has nulls ({col.null_count} of {len(col)} rows)")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=pa.schema(S.TABLES[table]))


def empty_table(table: str) -> pa.Table:
    return pa.schema(S.TABLES[table]).empty_table()


def _read_forward(parts: str, warnings: list[str]) -> tuple[pa.Table, list[dict]]:
    """All workers' forward rows, and each worker's run metadata (weights, device)."""
    files = [f for f in sorted(glob.glob(os.path.join(parts, "forward-*.arrow")))
             if os.path.getsize(f) > 0]
    if not files:
        return empty_table("forward"), []
    streams = [read_stream(f, "forward", warnings) for f in files]
    workers = []
    for file, (_, meta) in zip(files, streams):
        try:
            worker = _run_metadata(meta, file).get("worker") or {}
        except TraceFormatError as exc:
            warnings.append(str(exc))
            continue
        if isinstance(worker, dict):
            workers.append({k: v for k, v in worker.items()
                            if not k.endswith("_bytes") or (isinstance(v, int) and v >= 0)})
        else:
            warnings.append(f"{file}: worker metadata is not a JSON object; ignored")
    return pa.concat_tables([table for table, _ in streams]), workers


def _end_records(parts: str) -> dict[str, dict]:
    records = {}
    for file in glob.glob(os.path.join(parts, "end-*.json")):
        try:
            with open(file) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records[str(record.get("writer", os.path.basename(file)))] = record
    return records


def _run_metadata(meta: dict, path: str) -> dict:
    try:
        run = json.loads(meta.get(S.META_RUN, b"{}"))
    except (ValueError, UnicodeDecodeError):
        raise TraceFormatError(f"{path}: run metadata is not valid JSON") from None
    if not isinstance(run, dict):
        raise TraceFormatError(f"{path}: run metadata is not a JSON object")
    return run


def row_counts(value) -> dict[str, int]:
    """An end record's per-table row counts; anything but {table: count >= 0} is ignored."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items()
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


# Run metadata the analyses read: objects, and the integers inside them.
_RUN_INTEGERS = {"engine": ("max_num_seqs", "max_num_batched_tokens"),
                 "kv": ("block_size", "usable_blocks", "bytes_per_block", "kv_tensor_bytes"),
                 "model": (), "hardware": ("memory_bytes",)}


def _checked_run(run: dict, warnings: list[str]) -> dict:
    """A field of the wrong JSON type is dropped with a warning, so no analysis trips on it."""
    for key, integers in _RUN_INTEGERS.items():
        section = run.get(key)
        if key in run and not isinstance(section, dict):
            warnings.append(f"run metadata: {key} is not a JSON object; ignored")
            run[key] = {}
            continue
        for name in integers:
            value = (section or {}).get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                warnings.append(f"run metadata: {key}.{name} = {value!r} is not a count; ignored")
                del section[name]
    return run


def _describe(data: bytes) -> str:
    if data[:4] == b"PAR1":
        return "it is a Parquet file"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in data[:256]):
        return "it looks like text"
    return "unknown binary content"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
