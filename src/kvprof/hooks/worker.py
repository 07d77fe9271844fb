"""Worker-side recording: how long each step's forward took, and memory readings.

Hooked at ``WorkerWrapperBase`` so it is the same for every model runner (V1 and
V2, CPU and GPU). On CUDA a pair of events is recorded on the current stream and
resolved later with ``query()``; the worker never synchronises for kvprof. A row
whose end event has not completed at a flush waits for the next flush (at most
``HOLD_ROWS`` rows wait), so its device time is not lost to the flush. Where the
CUPTI collector runs (``recorder.cupti``), each step's launches carry the step as
an external correlation id, and the flush fills the rows' per-category columns.
"""
from __future__ import annotations

import os
import time

from kvprof.format import schema as S
from kvprof.hooks import state
from kvprof.recorder.columns import RowBuffer
from kvprof.recorder.cupti import NO_SUMS, open_collector
from kvprof.recorder.memory import GpuReader, RssReader, rss_now
from kvprof.recorder.session import TraceSession, parts_dir

_now = time.monotonic_ns
WRITER_FAULT = "TraceWriter.worker"   # fault-injection name of this process's writer thread
HOLD_ROWS = 256        # rows at most kept back for their CUDA events past a flush
_SUMS_AT = 11          # position of the first collector column in a forward row


def _cuda_events():
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.Event
    except Exception:
        pass
    return None


class WorkerRecorder:
    """Forward timings of one worker process into ``forward-<rank>.arrow``."""

    def __init__(self, wrapper, path: str, options: dict):
        self.rank = int(getattr(wrapper, "rpc_rank", 0))
        self.event_cls = _cuda_events()
        self.collector, collector_status = None, {
            "active": False, "reason": "no CUDA device initialised in this worker"}
        if self.event_cls is not None:
            self.collector, collector_status = open_collector(bool(options.get("collector", True)))
        run = {"worker": {**worker_metadata(wrapper), "collector": collector_status}, "options": options}
        file_path = os.path.join(parts_dir(path), S.forward_file(self.rank))
        try:
            self.session = TraceSession(path, {"forward": file_path}, f"worker-{self.rank}", run)
        except Exception:
            if self.collector is not None:
                self.collector.close()
            raise
        self.rows = RowBuffer("forward", S.FORWARD)
        self.rss = RssReader()
        self.rss_every = max(1, int(options.get("rss_every", 8)))
        self.rss_value = self.rss.read()
        self.gpu = GpuReader()
        self.pending: list[tuple] = []   # (row index, start event, end event)
        self.last_step = -1              # of the last forward: a separate sample_tokens belongs to it
        self.flush_interval_ns = int(float(options.get("flush_interval_s", 1.0)) * 1e9)
        self.flush_rows = max(1, int(options.get("flush_rows") or 65536))
        self.last_flush_ns = _now()
        self.closed = False

    def before_forward(self, scheduler_output) -> tuple:
        entered = _now()
        start = None
        if self.event_cls is not None:
            start = self.event_cls(enable_timing=True)
            start.record()
        step = getattr(scheduler_output, "kvprof_step", -1)
        pushed = self._push(step)
        t0 = _now()
        # vLLM's step with nothing scheduled comes last before the engine idles: flush then.
        idle_next = getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0
        return step, t0, start, t0 - entered, idle_next, pushed

    def _push(self, step: int) -> bool:
        """The step's launches carry ``step + 1`` as CUPTI's external correlation id."""
        collector = self.collector
        if collector is None or step < 0 or not collector.still_alone():
            return False
        collector.push(step + 1)
        return True

    def after_forward(self, token: tuple) -> None:
        step, t0, start, before_cost, idle_next, pushed = token
        t1 = _now()
        self.last_step = step
        if pushed:
            self.collector.pop()
        rows = self.rows
        end = None
        if start is not None:
            end = self.event_cls(enable_timing=True)
            end.record()
        if len(rows) % self.rss_every == 0:
            self.rss_value = self.rss.read()
        gpu = self.gpu.read()
        rows.append((step, self.rank, t0, t1, None, self.rss_value, before_cost + _now() - t1, *gpu,
                     *NO_SUMS))
        if end is not None:   # after the row exists: an event that completed at once resolves into it
            self.pending.append((len(rows) - 1, start, end))
            self._resolve_events()
        if idle_next or len(rows) >= self.flush_rows or t1 - self.last_flush_ns >= self.flush_interval_ns:
            self.flush()

    def before_sample(self) -> bool:
        """Sampling as a separate call: its launches belong to the last forward's step."""
        return self._push(self.last_step)

    def after_sample(self, pushed: bool = False) -> None:
        """Sampling ran as a separate call: the step's forward ends now."""
        if pushed:
            self.collector.pop()
        if len(self.rows):
            row = self.rows.rows[-1]
            self.rows.rows[-1] = row[:3] + (_now(),) + row[4:]

    def _resolve_events(self) -> None:
        rows = self.rows.rows
        while self.pending and self.pending[0][2].query():
            pos, start, end = self.pending.pop(0)
            if pos < len(rows):
                row = rows[pos]
                rows[pos] = row[:4] + (int(start.elapsed_time(end) * 1e6),) + row[5:]

    def flush(self, final: bool = False) -> None:
        if self.session.writer.stats.error is not None and not self.closed:
            raise state.TraceWriteFailed(self.session.writer.stats.error)  # the hook guard stops tracing
        self.last_flush_ns = _now()
        self._resolve_events()
        cut = len(self.rows)
        if self.pending and not final and cut - self.pending[0][0] <= HOLD_ROWS:
            cut = self.pending[0][0]   # these rows wait for their end events
        else:
            self.pending.clear()   # unresolved device times stay null
        if self.collector is not None:
            self._fill_sums(self.collector.take(final))
        if cut:
            builder, n = self.rows.take(cut)
            self.pending = [(pos - cut, s, e) for pos, s, e in self.pending]
            if state.FAULT_POINT == WRITER_FAULT and state.fault_now(WRITER_FAULT):
                builder = state.FailingBuilder(WRITER_FAULT, builder)
            self.session.writer.submit("forward", builder, n)

    def sync(self, timeout: float = 30.0) -> None:
        """Hand the rows to the writer and wait for it: a write error raises now. Rows whose
        CUDA end events have not completed stay for a later flush (their device time)."""
        self.flush()
        self.session.writer.wait_idle(timeout)
        self.flush()

    def _fill_sums(self, steps: dict[int, list[int]]) -> None:
        """Add the collector's sums to the buffered rows of their steps; the rest came late."""
        rows = self.rows.rows
        for pos in range(len(rows) - 1, -1, -1):
            if not steps:
                break
            row = rows[pos]
            sums = steps.pop(row[0], None)
            if sums is not None:
                if row[_SUMS_AT] is not None:
                    sums = [a + b for a, b in zip(sums, row[_SUMS_AT:])]
                rows[pos] = row[:_SUMS_AT] + tuple(sums)
        self.collector.late_records += sum(sums[-1] for sums in steps.values())

    def close(self, cut_short: str | None = None) -> dict:
        if self.closed:
            return {}
        self.closed = True
        extra = None
        try:
            self.flush(final=True)
        finally:
            self.rss.close()
            if self.collector is not None:
                extra = {"collector": self.collector.close()}
        return self.session.close(cut_short, extra)


def worker_metadata(wrapper) -> dict:
    """Weights and device facts of this worker, where they can be read."""
    meta: dict = {"pid": os.getpid(), "rank": int(getattr(wrapper, "rpc_rank", 0))}
    meta["rss_at_start_bytes"] = rss_now()
    try:
        import torch
        meta["torch"] = torch.__version__
        meta["cuda"] = bool(torch.cuda.is_available())
        if meta["cuda"]:
            meta["device_name"] = torch.cuda.get_device_name()
            meta["device_total_bytes"] = int(torch.cuda.get_device_properties(
                torch.cuda.current_device()).total_memory)
        runner = wrapper.worker.model_runner
        meta["weights_bytes"], meta["weights_repacked_bytes"] = model_weight_bytes(runner.model)
        loaded = getattr(runner, "model_memory_usage", None)   # vLLM's own measure (CUDA runners)
        if loaded:
            meta["weights_loaded_bytes"] = int(loaded)
    except Exception:
        pass
    return meta


def model_weight_bytes(model) -> tuple[int, int]:
    """The model's weight bytes, however the backend laid them out, and the part of
    them that the backend repacked out of ``parameters()``.

    vLLM's CPU backend repacks linear weights into oneDNN or SGL kernels' own
    buffers and leaves an empty ``weight`` parameter behind, so a sum over
    ``parameters()`` misses them (on CPUs with AVX-512 bf16, or with float32
    weights). Such a layer still knows its shard's shape
    (``input_size_per_partition`` × ``output_size_per_partition``): it counts at
    that size in the weight's dtype, i.e. the bytes it held before packing."""
    total, repacked, seen = 0, 0, set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:   # tied weights (embedding and LM head) count once
                continue
            seen.add(id(param))
            size = param.numel()
            if size == 0 and name == "weight":
                size = _repacked_weight_numel(module)
                repacked += size * param.element_size()
            total += size * param.element_size()
    return int(total), int(repacked)


def _repacked_weight_numel(module) -> int:
    rows = getattr(module, "output_size_per_partition", None)
    cols = getattr(module, "input_size_per_partition", None)
    if isinstance(rows, int) and isinstance(cols, int):
        return rows * cols
    return 0
