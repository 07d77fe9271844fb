"""Reading a table batch by batch from disk, so that the analyzer never holds it whole.

``request_steps`` is the one table that grows with every sequence of every step (a
day of a busy engine is hundreds of millions of rows): ``kvprof analyze`` reads it
through a ``TableStream``, one record batch at a time, with the same checks and the
same salvage of a cut file as the in-memory reader. The file is read with plain
buffered reads (no memory map), so its pages never count as the process's memory.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from kvprof.errors import NewerFormatError, TraceFormatError
from kvprof.format import schema as S

_FILE_MAGIC = b"ARROW1"
_STREAM_CONTINUATION = b"\xff\xff\xff\xff"


class TableStream:
    """One kvprof table on disk, readable batch by batch (and more than once).

    After a pass: ``metadata`` (the schema's), ``rows_read`` (rows in complete batches)
    and ``cut`` (why the file ended early; None: it did not)."""

    def __init__(self, path: str, table: str):
        self.path = path
        self.table = table
        self.metadata: dict = {}
        self.rows_read: int | None = None
        self.cut: str | None = None

    def checked(self) -> "TableStream":
        """Self, once the file opens as this table (metadata, columns, types): a bad file
        fails here, before any work, with the reader's one-line errors."""
        with _open_file(self.path) as source:
            self._open_checked(source)
        return self

    def batches(self, columns: tuple[str, ...] | None = None) -> Iterator[pa.RecordBatch]:
        """The complete, valid record batches in order, holding ``columns`` (default: all),
        each conformed to the schema. A cut file ends the iteration early and sets ``cut``."""
        for batch in self._raw_batches(columns):
            yield conformed_batch(batch, self.table, self.path, columns)

    @property
    def cuts(self) -> list[str]:
        return [self.cut] if self.cut else []

    def read_all(self) -> pa.Table:
        """The whole table in memory (for the analyses that need every row at once)."""
        batches = list(self._raw_batches())
        try:
            whole = pa.Table.from_batches(batches, schema=self._schema)
        except pa.ArrowException as exc:
            raise TraceFormatError(f"{self.path}: unreadable table {self.table} "
                                   f"({first_line(exc)})") from None
        return _conformed(whole, self.table, self.path)

    def _raw_batches(self, columns: tuple[str, ...] | None = None) -> Iterator[pa.RecordBatch]:
        """The file's batches; with ``columns``, only those are decoded (decompressed)."""
        rows = 0
        with _open_file(self.path) as source:
            reader = self._open_checked(source)
            if columns:
                names = reader.schema.names
                fields = sorted(names.index(c) for c in set(columns) if c in names)
                source.seek(0)
                reader = _open(source, self.path, ipc.IpcReadOptions(included_fields=fields))
            for batch in _valid_batches(reader, self):
                rows += batch.num_rows
                yield batch
        self.rows_read = rows

    def _open_checked(self, source):
        reader = _open(source, self.path)
        self._schema = reader.schema
        self.metadata = dict(reader.schema.metadata or {})
        check_metadata(self.metadata, self.path, self.table)
        _conformed(reader.schema.empty_table(), self.table, self.path)   # columns and types
        return reader


class ChainedStream:
    """One table written as several files (the forward table: one per worker rank), read
    as one stream, file after file."""

    def __init__(self, streams: list[TableStream]):
        self.streams = streams

    def batches(self, columns: tuple[str, ...] | None = None) -> Iterator[pa.RecordBatch]:
        for stream in self.streams:
            yield from stream.batches(columns)

    @property
    def rows_read(self) -> int:
        return sum(stream.rows_read or 0 for stream in self.streams)

    @property
    def cuts(self) -> list[str]:
        return [cut for stream in self.streams for cut in stream.cuts]

    def read_all(self) -> pa.Table:
        return pa.concat_tables([stream.read_all() for stream in self.streams])


def conformed_batch(batch: pa.RecordBatch, table: str, path: str, columns=None) -> pa.RecordBatch:
    """A batch in the schema's columns and types (see ``reader.conform``), keeping ``columns``."""
    tbl = _conformed(pa.Table.from_batches([batch]), table, path, " of a record batch", columns)
    if columns:
        tbl = tbl.select(list(columns))
    return tbl.combine_chunks().to_batches()[0] if tbl.num_rows else \
        pa.RecordBatch.from_arrays([pa.array([], f.type) for f in tbl.schema], schema=tbl.schema)


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


def conform(tbl: pa.Table, table: str, path: str, where: str = "", only=None) -> pa.Table:
    """Columns in schema order with the schema's types; extra (newer minor) columns dropped.
    ``only``: just these columns (the others were not read)."""
    columns = []
    fields = [f for f in S.TABLES[table] if only is None or f.name in only]
    for f in fields:
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
                f"{path}: column {table}.{f.name} has nulls ({col.null_count} of {len(col)} rows{where})")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _conformed(tbl: pa.Table, table: str, path: str, where: str = "", only=None) -> pa.Table:
    try:
        return conform(tbl, table, path, where, only)
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"{path}: unreadable table {table} ({first_line(exc)})") from None


def read_ahead(batches: Iterator, depth: int = 2) -> Iterator:
    """``batches`` produced on a thread, ``depth`` ahead of the consumer: Arrow's reading
    and decompression release the GIL, so they overlap with the consumer's work."""
    end = object()
    queue: list = []
    iterator = iter(batches)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for _ in range(depth):
            queue.append(pool.submit(next, iterator, end))
        while True:
            batch = queue.pop(0).result()
            if batch is end:
                return
            queue.append(pool.submit(next, iterator, end))
            yield batch


def _valid_batches(reader, stream: TableStream) -> Iterator[pa.RecordBatch]:
    stream.cut = None
    count = 0
    try:
        for batch in reader:
            batch.validate(full=True)
            count += 1
            yield batch
    except (pa.ArrowException, OSError) as exc:
        stream.cut = (f"{os.path.basename(stream.path)}: cut after {count} complete batches "
                      f"({first_line(exc)})")


def _open_file(path: str) -> pa.NativeFile:
    try:
        return pa.OSFile(path, "rb")
    except FileNotFoundError:
        raise TraceFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceFormatError(f"{path}: is a folder, not a trace file") from None
    except OSError as exc:
        if os.path.isdir(path):
            raise TraceFormatError(f"{path}: is a folder, not a trace file") from None
        raise TraceFormatError(f"{path}: cannot read ({exc.strerror or first_line(exc)})") from None


def _open(source: pa.NativeFile, path: str, options: ipc.IpcReadOptions | None = None):
    """A stream reader, or a file reader's batches (a file cut before its footer is read
    as the stream it starts with, after the 8-byte preamble)."""
    head = source.read(256)
    if not head:
        raise TraceFormatError(f"{path}: empty file")
    if head[:6] == _FILE_MAGIC:
        try:
            source.seek(0)
            return _FileBatches(ipc.open_file(source, options=options))
        except (pa.ArrowException, OSError):
            source.seek(8)
    elif head[:4] == _STREAM_CONTINUATION:
        source.seek(0)
    else:
        raise TraceFormatError(f"{path}: not an Arrow IPC file ({_describe(head)})")
    try:
        return _StreamBatches(ipc.open_stream(source, options=options))
    except (pa.ArrowException, OSError) as exc:
        raise TraceFormatError(f"{path}: unreadable Arrow stream ({first_line(exc)})") from None


def _describe(head: bytes) -> str:
    if head[:4] == b"PAR1":
        return "it is a Parquet file"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "it looks like text"
    return "unknown binary content"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _StreamBatches:
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
