"""Opening a trace's files in one process and closing them with an end record."""
from __future__ import annotations

import json
import os
import shutil
import time

from kvprof.format import schema
from kvprof.recorder.writer import MAX_PENDING_ROWS, StreamSet, TraceWriter, write_end_record


def parts_dir(path: str) -> str:
    return path + schema.PARTS_SUFFIX


def end_record_path(path: str, writer: str) -> str:
    return os.path.join(parts_dir(path), f"end-{writer}.json")


class TraceSession:
    """The streams one process writes, their writer thread, and how they end."""

    def __init__(self, path: str, tables: dict[str, str], writer: str, run: dict,
                 max_pending: int = 64, max_pending_rows: int = MAX_PENDING_ROWS):
        self.path = path
        self.writer_name = writer
        self.started_ns = time.monotonic_ns()
        run_json = json.dumps(run, sort_keys=True, default=str)
        streams = StreamSet()
        try:
            for table, file_path in tables.items():
                streams.open(table, file_path, schema.schema_for(table, writer=writer, run_json=run_json))
        except Exception:   # a full disk at the start: no file is left open
            try:
                streams.close()
            except Exception:
                pass
            raise
        self.writer = TraceWriter(streams, max_pending=max_pending, max_pending_rows=max_pending_rows)
        self.closed = False

    def close(self, cut_short: str | None = None, extra: dict | None = None) -> dict:
        if self.closed:
            return {}
        self.closed = True
        stats = self.writer.close()
        record = {
            "writer": self.writer_name,
            "pid": os.getpid(),
            "complete": cut_short is None and stats.error is None,
            "cut_short": cut_short or stats.error,
            "rows_written": stats.rows_written,
            "rows_dropped": stats.rows_dropped,
            "writer_build_ns": stats.build_ns,
            "started_ns": self.started_ns,
            "stopped_ns": time.monotonic_ns(),
            **(extra or {}),
        }
        try:
            write_end_record(end_record_path(self.path, self.writer_name), record)
        except OSError:
            pass
        return record


LOCK_FILE = ".writer.lock"   # in the parts folder; held (flock) by the EngineCore writing the trace


def replica_path(path: str, dp_rank: int) -> str:
    """Where data-parallel replica ``dp_rank`` writes a trace the user named ``path``:
    ``serve.arrow`` becomes ``serve.dp1.arrow``. Each replica's EngineCore is a writer of
    its own, and two writers never share a file."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.dp{dp_rank}{ext or '.arrow'}"


def prepare_target(path: str, overwrite: bool) -> None:
    """Fail early and clearly if the trace cannot be written at ``path``; never touch a
    trace that another process is writing."""
    from kvprof.errors import TraceTargetError

    folder = os.path.dirname(os.path.abspath(path))
    parts = parts_dir(path)
    if not os.path.isdir(folder):
        raise TraceTargetError(f"cannot write trace {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TraceTargetError(f"cannot write trace {path}: folder {folder} is not writable")
    if os.path.isdir(path):
        raise TraceTargetError(f"cannot write trace {path}: it is a folder")
    leftovers = os.path.isdir(parts) and [f for f in os.listdir(parts) if f != LOCK_FILE]
    if (os.path.exists(path) or leftovers) and not overwrite:
        raise TraceTargetError(f"trace {path} exists; pass overwrite=True to replace it")
    _refuse_if_being_written(path)
    try:
        if os.path.exists(path):
            os.remove(path)
        os.makedirs(parts, exist_ok=True)
        for name in os.listdir(parts):   # the lock file stays: another writer may be waiting on it
            if name != LOCK_FILE:
                target = os.path.join(parts, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    except OSError as exc:
        raise TraceTargetError(f"cannot write trace {path}: {exc.strerror or exc}") from None


class WriterLock:
    """An exclusive ``flock`` on the trace's lock file, held while one process writes it.

    The kernel drops it when the process dies, so a crashed writer leaves no stale lock."""

    def __init__(self, path: str):
        import fcntl
        from kvprof.errors import TraceTargetError

        os.makedirs(parts_dir(path), exist_ok=True)
        self.fd = os.open(os.path.join(parts_dir(path), LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(self.fd)
            os.close(self.fd)
            raise TraceTargetError(f"cannot write trace {path}: process {holder} is writing it") from None
        try:   # who holds it, for the refusal message; a full disk must not stop the trace here
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock
            self.fd = None


def _refuse_if_being_written(path: str) -> None:
    if os.path.exists(os.path.join(parts_dir(path), LOCK_FILE)):
        WriterLock(path).release()   # raises TraceTargetError while another process holds it


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except OSError:
        return "?"
