"""Worker-side recording: how long each step's forward took, and memory readings.

Hooked at ``WorkerWrapperBase`` so it is the same for every model runner (V1 and
V2, CPU and GPU). On CUDA a pair of events is recorded on the current stream and
resolved later with ``query()``; the worker never synchronises for kvprof.
"""
from __future__ import annotations

import os
import time

from kvprof.format import schema as S
from kvprof.hooks import state
from kvprof.recorder.columns import RowBuffer
from kvprof.recorder.memory import GpuReader, RssReader, rss_now
from kvprof.recorder.session import TraceSession, parts_dir

_now = time.monotonic_ns
WRITER_FAULT = "TraceWriter.worker"   # fault-injection name of this process's writer thread


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
        run = {"worker": worker_metadata(wrapper), "options": options}
        file_path = os.path.join(parts_dir(path), S.forward_file(self.rank))
        self.session = TraceSession(path, {"forward": file_path}, f"worker-{self.rank}", run)
        self.rows = RowBuffer("forward", S.FORWARD)
        self.rss = RssReader()
        self.rss_every = max(1, int(options.get("rss_every", 8)))
        self.rss_value = self.rss.read()
        self.gpu = GpuReader()
        self.event_cls = _cuda_events()
        self.pending: list[tuple] = []   # (row index, start event, end event)
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
        t0 = _now()
        # vLLM's step with nothing scheduled comes last before the engine idles: flush then.
        idle_next = getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0
        return getattr(scheduler_output, "kvprof_step", -1), t0, start, t0 - entered, idle_next

    def after_forward(self, token: tuple) -> None:
        step, t0, start, before_cost, idle_next = token
        t1 = _now()
        rows = self.rows
        if start is not None:
            end = self.event_cls(enable_timing=True)
            end.record()
            self.pending.append((len(rows), start, end))
            self._resolve_events()
        if len(rows) % self.rss_every == 0:
            self.rss_value = self.rss.read()
        gpu = self.gpu.read()
        rows.append((step, self.rank, t0, t1, None, self.rss_value, before_cost + _now() - t1, *gpu))
        if idle_next or len(rows) >= self.flush_rows or t1 - self.last_flush_ns >= self.flush_interval_ns:
            self.flush()

    def after_sample(self) -> None:
        """Sampling ran as a separate call: the step's forward ends now."""
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

    def flush(self) -> None:
        if self.session.writer.stats.error is not None and not self.closed:
            raise state.TraceWriteFailed(self.session.writer.stats.error)  # the hook guard stops tracing
        self.last_flush_ns = _now()
        self._resolve_events()
        self.pending.clear()   # unresolved device times stay null
        if len(self.rows):
            builder, n = self.rows.take()
            if state.FAULT_POINT == WRITER_FAULT and state.fault_now(WRITER_FAULT):
                builder = state.FailingBuilder(WRITER_FAULT, builder)
            self.session.writer.submit("forward", builder, n)

    def sync(self, timeout: float = 30.0) -> None:
        """Hand every row to the writer and wait for it: a write error raises now."""
        self.flush()
        self.session.writer.wait_idle(timeout)
        self.flush()

    def close(self, cut_short: str | None = None) -> dict:
        if self.closed:
            return {}
        self.closed = True
        try:
            self.flush()
        finally:
            self.rss.close()
        return self.session.close(cut_short)


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
