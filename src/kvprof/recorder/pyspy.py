"""Host stacks: py-spy samples the EngineCore and worker processes while a trace records.

The EngineCore's recorder side starts one ``py-spy record --format chrometrace``
per traced process and stops it with SIGINT when tracing stops; py-spy then
writes its JSON, which is turned here into the ``host_samples`` and
``host_frames`` tables (format 1.1, see docs/format.md). py-spy runs as a
separate program: the engine only pays for being read (``--nonblocking``: its
threads are not paused). Nothing here may break the engine: every failure ends
in one warning and a trace without host stacks.

Clock: py-spy stamps each change of a thread's stack with microseconds since its
own start, which is within a millisecond of the moment kvprof launched it (the
launch time on ``time.monotonic_ns()`` is the offset added to every stamp).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa

from kvprof.format import schema as S
from kvprof.recorder.writer import StreamSet

log = logging.getLogger("kvprof")
ENV_PY_SPY = "KVPROF_PY_SPY"
DEFAULT_RATE = 100          # py-spy's own default, samples per second
STOP_TIMEOUT_S = 30
READY_TIMEOUT_S = 30        # py-spy attaching to a large process (torch) on a slow machine
READY_LINE = b"Sampling process"   # what py-spy prints on stdout once its SIGINT handler is set
_THREAD_FRAME = re.compile(r"^thread \((\d+)\): ?(.*)$")   # the frame --threads adds at the bottom


def env_enabled() -> bool:
    return os.environ.get(ENV_PY_SPY, "").strip().lower() in ("1", "true", "yes", "on")


def binary() -> str | None:
    """The py-spy program: beside this Python (a virtualenv's bin/), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.access(beside, os.X_OK) else shutil.which("py-spy")


class Sampler:
    """One py-spy per process; ``stop()`` then ``write_tables()``."""

    def __init__(self, path: str, processes: dict[int, str], rate: int = DEFAULT_RATE):
        self.path = path
        self.rate = int(rate)
        self.runs: list[dict] = []
        self.failed: dict[str, str] = {}     # process -> why py-spy could not sample it
        self.stopping = False
        program = binary()
        if program is None:
            raise OSError("py-spy is not installed (pip install py-spy)")
        try:
            for pid, process in processes.items():
                self._launch(program, pid, process)
        except Exception:   # none is left running when one cannot start
            self.kill()
            raise

    def _launch(self, program: str, pid: int, process: str) -> None:
        out = os.path.join(self.path + S.PARTS_SUFFIX, f"pyspy-{process}.json")
        err, said = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [program, "record", "--pid", str(pid), "--format", "chrometrace", "--output", out,
             "--rate", str(self.rate), "--threads", "--idle", "--nonblocking", "--full-filenames"],
            stdin=subprocess.DEVNULL, stdout=said, stderr=err,
            start_new_session=True)   # a Ctrl-C in the user's terminal does not reach it
        # py-spy's clock starts in its main, after the exec that Popen waits for: stamping
        # here, not before the fork, leaves out the fork and exec (ms on a loaded machine)
        started_ns = time.monotonic_ns()
        run = {"pid": pid, "process": process, "proc": proc, "out": out, "err": err,
               "said": said, "started_ns": started_ns}
        self.runs.append(run)
        threading.Thread(target=self._watch, args=(run,), daemon=True,
                         name=f"kvprof-pyspy-{process}").start()

    def _watch(self, run: dict) -> None:
        """py-spy that exits on its own could not attach (no ptrace rights): say why, once."""
        code = run["proc"].wait()
        if not self.stopping and code != 0:
            self._failed(run, f"exit code {code}")

    def _failed(self, run: dict, fallback: str) -> None:
        if run["process"] in self.failed:
            return
        reason = _first_error_line(run["err"]) or fallback
        self.failed[run["process"]] = reason
        log.warning("kvprof: py-spy cannot sample %s (pid %d): %s; tracing goes on without its "
                    "host stacks", run["process"], run["pid"], reason)

    def stop(self) -> None:
        """SIGINT makes py-spy write its file and exit, once it is sampling: a SIGINT
        that arrives while it still attaches kills it without a file (a traced run
        shorter than the attach, on a fast machine)."""
        self.stopping = True
        deadline = time.monotonic() + READY_TIMEOUT_S
        for run in self.runs:
            _wait_until_sampling(run, deadline)
            if run["proc"].poll() is None:
                run["proc"].send_signal(signal.SIGINT)
        for run in self.runs:
            try:
                run["proc"].wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                run["proc"].kill()
                run["proc"].wait()
            if not os.path.exists(run["out"]):
                self._failed(run, f"no output (exit code {run['proc'].returncode})")

    def kill(self) -> None:
        self.stopping = True
        for run in self.runs:
            if run["proc"].poll() is None:
                run["proc"].kill()

    def write_tables(self) -> dict:
        """Convert py-spy's files into host_samples / host_frames; a summary for the end record."""
        frames = FrameTable()
        samples = []
        for run in self.runs:
            if run["process"] in self.failed:
                continue
            try:
                with open(run["out"]) as f:
                    events = json.load(f)
                samples.extend(stack_runs(events, run["started_ns"], run["process"], frames))
                os.remove(run["out"])
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self._failed(run, f"unreadable py-spy output ({type(exc).__name__}: {exc})")
        folder = self.path + S.PARTS_SUFFIX
        write_table(os.path.join(folder, S.PART_FILES["host_samples"]), "host_samples", samples)
        write_table(os.path.join(folder, S.PART_FILES["host_frames"]), "host_frames", frames.rows)
        return {"rate_hz": self.rate, "runs": len(samples), "frames": len(frames.rows),
                "processes": {r["process"]: r["pid"] for r in self.runs},
                "failed": dict(self.failed)}


class FrameTable:
    """(function, file, line) -> frame id."""

    def __init__(self):
        self.ids: dict[tuple, int] = {}
        self.rows: list[tuple] = []

    def id(self, function: str, file: str, line: int) -> int:
        key = (function, file, line)
        frame = self.ids.get(key)
        if frame is None:
            frame = self.ids[key] = len(self.rows)
            self.rows.append((frame, function, file, line))
        return frame


def stack_runs(events: list, origin_ns: int, process: str, frames: FrameTable) -> list[tuple]:
    """py-spy's B/E events, per thread, back into runs of one stack: host_samples rows.

    At one time stamp a thread's events are its stack's change (ends, then begins):
    the stack held before the first of them ran from the previous change until then."""
    state: dict[tuple, list] = {}   # (pid, tid) -> [stack of frame ids (outermost first), since, tid, name]
    rows = []
    for ev in events:
        ph = ev.get("ph")
        if ph not in ("B", "E"):
            continue
        key = (ev["pid"], ev["tid"])
        ts = int(ev["ts"])
        st = state.setdefault(key, [[], ts, ev["tid"], ""])
        if ts != st[1]:
            if st[0]:
                rows.append((origin_ns + st[1] * 1000, (ts - st[1]) * 1000, int(ev["pid"]), process,
                             int(st[2]), st[3], st[0][::-1]))
            st[1] = ts
        match = _THREAD_FRAME.match(ev.get("name", "")) if not ev.get("args", {}).get("filename") else None
        if match:   # the thread's pseudo-frame: its id and name, not a frame of code
            st[2], st[3] = int(match.group(1)), match.group(2)
        elif ph == "B":
            args = ev.get("args") or {}
            st[0] = st[0] + [frames.id(str(ev.get("name", "")), str(args.get("filename", "")),
                                       int(args.get("line") or 0))]
        elif st[0]:
            st[0] = st[0][:-1]
    return rows


def write_table(path: str, table: str, rows: list[tuple]) -> None:
    fields = S.TABLES[table]
    columns = list(zip(*rows)) if rows else [[] for _ in fields]
    batch = pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for f, c in zip(fields, columns)],
                                       schema=pa.schema(fields))
    streams = StreamSet()
    streams.open(table, path, S.schema_for(table, writer="engine_core"))
    try:
        streams.write(table, batch)
    finally:
        streams.close()


def _wait_until_sampling(run: dict, deadline: float) -> None:
    """Until py-spy says it samples, or has exited, or the deadline passes."""
    while run["proc"].poll() is None and time.monotonic() < deadline:
        try:
            if READY_LINE in os.pread(run["said"].fileno(), 4096, 0):
                return
        except OSError:
            return
        time.sleep(0.01)


def _first_error_line(err) -> str:
    try:
        err.seek(0)
        lines = [ln.strip() for ln in err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except (OSError, ValueError):
        return ""
    for line in lines:
        if "error" in line.lower() or "denied" in line.lower():
            return line
    return lines[0] if lines else ""
