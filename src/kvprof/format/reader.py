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

from kvprof.errors import TraceFormatError
from kvprof.format import schema as S
from kvprof.format.stream import ChainedStream, TableStream



@dataclass
class Trace:
    """A trace: one Arrow table per kvprof table (in memory, or streamed from disk), plus
    what is known about it."""

    path: str
    format_version: str
    run: dict
    tables: dict[str, pa.Table]
    end_records: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False
    streams: dict[str, TableStream] = field(default_factory=dict)   # tables left on disk

    def __getitem__(self, table: str) -> pa.Table:
        if table not in self.tables and table in self.streams:   # needed whole after all
            self.tables[table] = self.streams[table].read_all()
            self._checked_pass(table, self.tables[table].num_rows)
        return self.tables[table]

    def batches(self, table: str, columns: tuple[str, ...] | None = None):
        """The table's record batches holding ``columns``: read from disk one at a time
        for a streamed table (its cut and row checks land in ``warnings`` at the end)."""
        if table in self.tables:
            chosen = self.tables[table].select(list(columns)) if columns else self.tables[table]
            yield from chosen.to_batches()
            return
        stream = self.streams[table]
        yield from stream.batches(columns)
        self._checked_pass(table, stream.rows_read)

    def _checked_pass(self, table: str, rows: int) -> None:
        stream = self.streams[table]
        notes = stream.cuts + rows_cut(self, table, rows)
        if table == "forward":
            ranks = [_rank_of(s.path) for s in stream.streams if s.rows_read]
            notes += workers_without_end(self, [r for r in ranks if r is not None])
        notes = [n for n in notes if n not in self.warnings]
        at = 0 if table == "steps" else len(self.warnings)   # the main file's news first
        self.warnings[at:at] = notes

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


def read_trace(path: str, tables: tuple[str, ...] | None = None,
               stream: tuple[str, ...] = ()) -> Trace:
    """Read the trace at ``path`` (the main file the user named); the tables named in
    ``stream`` stay on disk (their schema checked now), read batch by batch on demand."""
    path = os.fspath(path)
    warnings: list[str] = []
    _refuse_replica_set(path)
    loaded, streams = {}, {}
    if "steps" in stream:
        streams["steps"] = TableStream(path, "steps").checked()
        meta = streams["steps"].metadata
    else:
        loaded["steps"], meta = read_stream(path, "steps", warnings)
    version = meta.get(S.META_FORMAT, b"").decode()
    run = _checked_run(_run_metadata(meta, path), warnings)
    wanted = tables or tuple(t for t in S.TABLES if t != "steps")
    parts = path + S.PARTS_SUFFIX
    for table in wanted:
        if table == "forward":
            forward, run["workers"] = _read_forward(parts, warnings, "forward" in stream)
            (streams if isinstance(forward, ChainedStream) else loaded)["forward"] = forward
        elif table != "steps":
            part = os.path.join(parts, S.PART_FILES[table])
            if os.path.exists(part) and os.path.getsize(part) > 0 and table in stream:
                streams[table] = TableStream(part, table).checked()
            elif os.path.exists(part) and os.path.getsize(part) > 0:
                loaded[table] = read_stream(part, table, warnings)[0]
            elif table in S.OPTIONAL_TABLES:   # an older minor version, or not recorded
                loaded[table] = empty_table(table)
            else:
                warnings.append(f"{table}: missing or empty part file ({part})")
                loaded[table] = empty_table(table)
    trace = Trace(path, version, run, loaded, _end_records(parts), warnings, streams=streams)
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
    for table, tbl in trace.tables.items():
        trace.warnings.extend(rows_cut(trace, table, tbl.num_rows))
    forward = trace.tables.get("forward")
    if forward is not None and forward.num_rows:
        trace.warnings.extend(workers_without_end(trace, forward.column("rank").to_pylist()))


def workers_without_end(trace: Trace, ranks) -> list[str]:
    """[a warning] when a rank that wrote forward rows has no end record (marks the trace
    truncated); [] otherwise."""
    missing = sorted(r for r in set(ranks) if f"worker-{r}" not in trace.end_records)
    if not missing:
        return []
    trace.truncated = True
    return [f"no end record from worker(s) {missing}: their last rows may be lost"]


def _rank_of(path: str) -> int | None:
    """The rank a worker's forward file is named after (``forward-<rank>.arrow``)."""
    rank = os.path.basename(path).removeprefix("forward-").removesuffix(".arrow")
    return int(rank) if rank.isdigit() else None


def rows_cut(trace: Trace, table: str, rows_on_disk: int) -> list[str]:
    """[a warning] when the writers' end records wrote more rows of ``table`` than are on
    disk (also marks the trace truncated); [] otherwise."""
    written = sum(row_counts(end.get("rows_written")).get(table, 0)
                  for end in trace.end_records.values())
    if rows_on_disk >= written:
        return []
    trace.truncated = True
    return [f"{table}: {rows_on_disk} rows on disk, {written} written: the file was cut"]


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
    """One kvprof stream in memory: checked against the schema, salvaged up to a cut."""
    stream = TableStream(path, table)
    result = stream.read_all()
    if stream.cut:
        warnings.append(stream.cut)
    return result, stream.metadata


def empty_table(table: str) -> pa.Table:
    return pa.schema(S.TABLES[table]).empty_table()


def _read_forward(parts: str, warnings: list[str], stream: bool = False):
    """All workers' forward rows (a table, or a ChainedStream left on disk), and each
    worker's run metadata (weights, device)."""
    files = [f for f in sorted(glob.glob(os.path.join(parts, "forward-*.arrow")))
             if os.path.getsize(f) > 0]
    if not files:
        return empty_table("forward"), []
    if stream:
        streams = [TableStream(f, "forward").checked() for f in files]
        tables, metas = ChainedStream(streams), [s.metadata for s in streams]
    else:
        read = [read_stream(f, "forward", warnings) for f in files]
        tables, metas = pa.concat_tables([t for t, _ in read]), [m for _, m in read]
    return tables, [w for file, meta in zip(files, metas)
                    if (w := _worker_metadata(file, meta, warnings)) is not None]


def _worker_metadata(file: str, meta: dict, warnings: list[str]) -> dict | None:
    try:
        worker = _run_metadata(meta, file).get("worker") or {}
    except TraceFormatError as exc:
        warnings.append(str(exc))
        return None
    if not isinstance(worker, dict):
        warnings.append(f"{file}: worker metadata is not a JSON object; ignored")
        return None
    return {k: v for k, v in worker.items() if not k.endswith("_bytes") or (isinstance(v, int) and v >= 0)}


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
