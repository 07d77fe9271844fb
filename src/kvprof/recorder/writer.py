"""The writer thread: turns swapped column buffers into compressed Arrow IPC streams.

The engine thread never waits on it: batches go through a bounded queue with
``put_nowait``; when the queue is full the batch is dropped and counted, and the
count is written into the trace's end record. Each stream is flushed after
every batch, so a ``kill -9`` loses at most what had not yet been handed over.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.ipc as ipc

_STOP = object()


@dataclass
class WriterStats:
    batches_written: int = 0
    build_ns: int = 0          # writer-thread time turning buffers into Arrow batches
    rows_written: dict[str, int] = field(default_factory=dict)
    rows_dropped: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class StreamSet:
    """Open Arrow IPC stream writers, one per table, in one process."""

    def __init__(self):
        self._writers: dict[str, tuple[ipc.RecordBatchStreamWriter, pa.NativeFile]] = {}

    def open(self, table: str, path: str, schema: pa.Schema) -> None:
        sink = pa.OSFile(path, "wb")
        options = ipc.IpcWriteOptions(compression="zstd")
        writer = ipc.new_stream(sink, schema, options=options)
        # A zero-row batch forces the schema (and its format version) onto disk now,
        # so a process killed before its first flush still leaves a readable stream.
        writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
        sink.flush()
        self._writers[table] = (writer, sink)

    def write(self, table: str, batch: pa.RecordBatch) -> None:
        writer, sink = self._writers[table]
        writer.write_batch(batch)
        sink.flush()

    def close(self) -> None:
        """Close every stream, even after one fails (a full disk); then raise the first error."""
        errors = []
        for writer, sink in self._writers.values():
            for close in (writer.close, sink.close):
                try:
                    close()
                except Exception as exc:
                    errors.append(exc)
        self._writers.clear()
        if errors:
            raise errors[0]


MAX_PENDING_ROWS = 262_144    # about four flush windows of a 64-sequence engine


class TraceWriter:
    """A daemon thread draining a bounded queue of (table, fields, columns).

    The queue is bounded twice: by batches, and by the rows they hold, so that a
    stalled disk costs a bounded amount of memory whatever the batch sizes."""

    def __init__(self, streams: StreamSet, max_pending: int = 64,
                 max_pending_rows: int = MAX_PENDING_ROWS):
        self.streams = streams
        self.stats = WriterStats()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0        # batches handed over and not yet written or dropped
        self._pending_rows = 0
        self._max_pending_rows = max_pending_rows
        self._thread = threading.Thread(target=self._run, name="kvprof-writer", daemon=True)
        self._thread.start()

    def submit(self, table: str, builder, rows: int) -> bool:
        """Hand a batch over without waiting; False (and counted) when it was dropped.

        ``builder()`` runs on the writer thread and returns the RecordBatch; a builder
        with a ``discard(final)`` method is told when its batch is dropped instead."""
        if rows == 0:
            return True
        if self.stats.error is None and self._reserve(rows):
            with self._lock:
                self._unfinished += 1
            try:
                self._queue.put_nowait((table, builder, rows))
                return True
            except queue.Full:
                self._release(rows)
                self._finished_one()
        self._count_dropped(table, rows, builder, final=self.stats.error is not None)
        return False

    def _reserve(self, rows: int) -> bool:
        with self._lock:
            if self._pending_rows and self._pending_rows + rows > self._max_pending_rows:
                return False
            self._pending_rows += rows
            return True

    def _release(self, rows: int) -> None:
        with self._lock:
            self._pending_rows -= rows

    def _finished_one(self) -> None:
        with self._lock:
            self._unfinished -= 1
            if self._unfinished == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every batch handed over so far is written or dropped (a failed write
        has then set ``stats.error``); False if that took longer than ``timeout``.

        This is how a caller learns the outcome of what it submitted without waiting for
        a later flush (``kvprof_status`` uses it; ``close`` drains the queue anyway)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def _count_dropped(self, table: str, rows: int, builder=None, final: bool = True) -> None:
        with self._lock:   # the engine thread and the writer thread both count
            self.stats.rows_dropped[table] = self.stats.rows_dropped.get(table, 0) + rows
        discard = getattr(builder, "discard", None)
        if discard is not None:
            discard(final)

    def _fail(self, exc: BaseException) -> None:
        """The first write error stops the writer. The recorder that owns it sees
        ``stats.error`` at its next flush, at a status call (which waits for the writer) or
        at stop, whichever comes first, and stops tracing with one warning."""
        self.stats.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            table, builder, rows = item
            self._release(rows)
            try:
                self._write(table, builder, rows)
            finally:
                self._finished_one()

    def _write(self, table: str, builder, rows: int) -> None:
        if self.stats.error is not None:
            self._count_dropped(table, rows, builder)
            return
        try:
            start = time.perf_counter_ns()
            batch = builder()
            self.stats.build_ns += time.perf_counter_ns() - start
            self.streams.write(table, batch)
        except Exception as exc:  # a full disk, a closed file, a bad row: stop writing, count the rest
            self._fail(exc)
            self._count_dropped(table, rows, builder)
            return
        self.stats.batches_written += 1
        self.stats.rows_written[table] = self.stats.rows_written.get(table, 0) + rows

    def close(self, timeout: float = 30.0) -> WriterStats:
        """Write what is queued (for at most ``timeout`` seconds), then close every stream."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            self.stats.error = self.stats.error or f"writer did not drain its queue in {timeout} s"
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.stats.error = self.stats.error or f"writer still busy after {timeout} s"
            return self.stats
        try:
            self.streams.close()
        except Exception as exc:
            if self.stats.error is None:
                self._fail(exc)
        return self.stats


def write_end_record(path: str, record: dict) -> None:
    """The end record says how the trace ended; its absence means the writer died."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
