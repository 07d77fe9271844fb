"""The analyzer's facade: ``analyze(trace) -> Analysis``; ``Analysis.to_dict()`` is the JSON report.

Pure: a ``kvprof.format.reader.Trace`` in, dataclasses and Arrow tables out, no
printing. The one pass over request_steps runs in ``_kernels`` (numba, fed batch by
batch from disk by ``replay``); the
per-topic analyses (latency, throughput, batch, kv, memory, step_model) are plain
NumPy on the results. Definitions and the JSON layout: docs/analyses.md.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

from kvprof.analysis.arrays import (arrow_column, arrow_table, batch_columns,  # noqa: F401
                                   columns as _columns, numpy_column)
from kvprof.analysis.batch import Batch, batch
from kvprof.analysis.device import DeviceTime
from kvprof.analysis.forward_pass import ROW_COLUMNS, ForwardSummary, forward_pass
from kvprof.analysis.host import HostTime, host_time
from kvprof.analysis.kv import KV, blocks_used, kv
from kvprof.analysis.latency import KINDS, Latency, latency
from kvprof.analysis.memory import Memory, memory, step_readings
from kvprof.analysis.predict import Requests, StepModel, fitted_model
from kvprof.analysis.ranks import Ranks, ranks, streamed_ranks
from kvprof.analysis.request_pass import Replay, load_kernels, replay  # noqa: F401 (re-exported)
from kvprof.analysis.step_model import fit, step_samples
from kvprof.analysis.step_pass import StepTable, step_pass, window_mask
from kvprof.analysis.throughput import Throughput, Tokens, throughput
from kvprof.errors import TraceFormatError, UsageError
from kvprof.format import schema as S

REPORT_VERSION = "1.2"   # 1.1: host_time; 1.2: ranks
NEEDED_TABLES = ("request_steps", "requests", "preemptions", "forward", "host_samples", "host_frames")
STREAMED_TABLES = ("steps", "request_steps", "forward", "requests")   # read batch by batch, never whole in Arrow
# step columns summed (batch, kv, memory) before the request pass and then let go: only the
# timeline shows them step by step, and it reads them again when a plot asks for it
# (20 bytes a step; step_pass column -> timeline column)
PLOT_ONLY = {"num_running": "running", "num_waiting": "waiting", "kv_blocks_used": "kv_blocks_used",
             "rss_bytes": "rss_bytes"}
BATCH_ONLY = ("prefill_reqs",)   # summed into the batch section, shown nowhere step by step
TIMELINE = ("step", "t_s", "step_ms", "running", "waiting", "kv_blocks_used", "decode_requests",
            "prefill_tokens", "total_tokens", "context_tokens", "output_tokens", "rss_bytes")
FORWARD_COLUMNS = tuple(f.name for f in S.TABLES["forward"])
NS_PER_S = 1e9
_REQUEST_COLUMNS = ("req", "arrival_ns", "queued_ns", "first_scheduled_ns", "first_token_ns",
                    "finish_ns", "first_scheduled_step", "finish_step", "prompt_tokens",
                    "cached_prompt_tokens", "output_tokens")


class EmptyTraceError(TraceFormatError):
    """A readable trace with nothing to analyse (no steps, or no finished request)."""


@dataclass
class Analysis:
    """Everything ``kvprof analyze`` reports about one trace (or one window of it)."""

    path: str
    format_version: str
    window_s: tuple[float, float] | None
    duration_s: float
    steps: int
    requests: int
    requests_finished: int
    requests_unfinished: int
    tokens: Tokens
    throughput: Throughput
    latency: Latency
    batch: Batch
    kv: KV
    memory: Memory
    step_time_model: StepModel
    device_time: DeviceTime
    timeline_columns: dict = field(repr=False)  # per selected step: see ``timeline``
    plot_columns: Callable[[], dict] = field(repr=False)   # PLOT_ONLY's columns, read when asked
    request_ids: Callable[[], pa.ChunkedArray] = field(repr=False)   # read when asked
    finished_rows: np.ndarray = field(repr=False)          # rows of requests in latency stats
    run: dict = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)
    host_time: HostTime | None = None   # py-spy's stacks by part of the engine (format 1.1)
    ranks: Ranks | None = None          # skew between worker ranks (tensor/pipeline parallel)
    span_ns: tuple[int, int] = (0, 0)   # first selected step's start, last one's end (monotonic)

    @cached_property
    def timeline(self) -> pa.Table:
        """One row per selected step, for plots and comparisons. Made when first asked:
        its float columns would be 16 bytes a step that a JSON or text report never reads."""
        columns = {**self.timeline_columns, **self.plot_columns()}
        start, end = columns.pop("t_schedule_start_ns"), columns.pop("t_update_end_ns")
        columns["t_s"] = (start - columns.pop("origin_ns")) / NS_PER_S
        columns["step_ms"] = (end - start) / 1e6
        return arrow_table({name: columns[name] for name in TIMELINE})

    @cached_property
    def all_request_ids(self) -> pa.ChunkedArray:
        """requests.request_id, every row: strings a JSON or text report never reads."""
        return self.request_ids()

    @cached_property
    def per_request(self) -> pa.Table:
        """One row per finished request: req, request_id and each latency in ms (null: undefined)."""
        lat = self.latency
        ids = self.all_request_ids.take(arrow_column(np.flatnonzero(self.finished_rows)))
        return arrow_table({"req": lat.per_request_ms["req"], "request_id": ids,
                            **{f"{kind}_ms": lat.per_request_ms[kind] for kind in KINDS
                               if kind != "itl"}})

    def to_dict(self) -> dict:
        """The JSON report (docs/analyses.md): stable key names, SI units named in the keys."""
        return {
            "report_version": REPORT_VERSION, "format_version": self.format_version,
            "trace": self.path,
            "window_s": list(self.window_s) if self.window_s else None,
            "duration_s": self.duration_s, "steps": self.steps, "requests": self.requests,
            "requests_finished": self.requests_finished,
            "requests_unfinished": self.requests_unfinished,
            "tokens": self.tokens.to_dict(), "throughput": self.throughput.to_dict(),
            "latency_ms": self.latency.to_dict(), "batch": self.batch.to_dict(),
            "kv": self.kv.to_dict(), "memory_bytes": self.memory.to_dict(),
            "step_time_model": self.step_time_model.to_dict(),
            "device_time": self.device_time.to_dict(),
            "host_time": self.host_time.to_dict() if self.host_time else None,
            "ranks": self.ranks.to_dict() if self.ranks else None,
            "warnings": list(self.warnings),
        }


@dataclass
class Selection:
    """The selected steps' columns and where they lie in the whole trace."""

    steps: dict[str, np.ndarray]       # columns of the selected steps only
    mask: np.ndarray                   # over all steps of the trace
    step_range: tuple[int, int] | None   # first and last selected step number; None: all
    origin_ns: int                     # the trace start
    span_ns: tuple[int, int]           # first schedule start, last update end

    @property
    def duration_s(self) -> float:
        return (self.span_ns[1] - self.span_ns[0]) / NS_PER_S

    def of(self, per_step: np.ndarray) -> np.ndarray:
        """A per-step array of the whole trace, at the selected steps (no copy without a window)."""
        return per_step if self.step_range is None else per_step[self.mask]


def analyze(trace, window: tuple[float | None, float | None] | None = None,
            predict: tuple = ()) -> Analysis:
    """Analyse ``trace``; ``window`` = (start, end) seconds from the trace start, end excluded."""
    table = step_pass(trace.batches("steps"), trace.path, window)   # every column decoded: checked
    steps = table.columns
    if steps["step"].size == 0:
        raise EmptyTraceError(f"{trace.path}: the trace holds no steps (empty trace)")
    requests = batch_columns(trace.batches("requests", _REQUEST_COLUMNS), _REQUEST_COLUMNS)
    if not (requests["finish_ns"] >= 0).any():
        raise EmptyTraceError(f"{trace.path}: no request finished in the trace "
                              f"({requests['req'].size} requests recorded); nothing to measure")
    sel = _selection(steps, window)
    summed = _summed_steps(sel, trace.run)
    for name in (*PLOT_ONLY, *BATCH_ONLY):   # the request pass's state takes their place
        del steps[name]
        sel.steps.pop(name, None)
    chosen = _in_range(requests["finish_step"], sel.step_range) & (requests["finish_ns"] >= 0)
    result = replay(trace, steps, requests, sel.mask, chosen)
    return _assemble(trace, window, predict, sel, table, requests, chosen, result, summed)


@dataclass
class SummedSteps:
    """What batch, kv and memory take from the selected steps' PLOT_ONLY and BATCH_ONLY
    columns."""

    batch: Batch
    blocks_used: tuple[int, float]
    readings: dict


def _summed_steps(sel: "Selection", run: dict) -> SummedSteps:
    st = sel.steps
    return SummedSteps(batch(st, run.get("engine", {})), blocks_used(st),
                       step_readings(st, run.get("kv", {}).get("bytes_per_block")))


def _selection(steps: dict, window) -> Selection:
    mask = select_steps(steps["t_schedule_start_ns"], window)
    sel = {name: col[mask] for name, col in steps.items()} if window else steps
    step_range = (int(sel["step"].min()), int(sel["step"].max())) if window else None
    return Selection(sel, mask, step_range, int(steps["t_schedule_start_ns"][0]),
                     (int(sel["t_schedule_start_ns"][0]), int(sel["t_update_end_ns"][-1])))


class Masked(Mapping):
    """Columns at the rows of a mask, taken when read: the finished requests of a long
    trace are most of its requests, and a copy of all their columns would stay alive
    through every later analysis."""

    def __init__(self, columns: dict[str, np.ndarray], mask: np.ndarray):
        self._columns, self._mask = columns, mask

    def __getitem__(self, name: str) -> np.ndarray:
        return self._columns[name][self._mask]

    def __iter__(self):
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)


def _in_range(step: np.ndarray, step_range) -> np.ndarray:
    """Steps (of requests' events) within the selection; -1 (never) is outside."""
    if step_range is None:
        return step >= 0
    return (step >= step_range[0]) & (step <= step_range[1])


def select_steps(schedule_start_ns: np.ndarray, window) -> np.ndarray:
    """Boolean mask of the steps whose schedule start lies in [start, end) seconds."""
    mask = window_mask(schedule_start_ns, int(schedule_start_ns[0]), window)
    if not mask.any():
        start, end = window
        rel = (schedule_start_ns[-1] - schedule_start_ns[0]) / NS_PER_S
        raise UsageError(f"--window {_fmt(start)}:{_fmt(end)} selects no step "
                         f"(the trace's steps start between 0 and {rel:.3f} s)")
    return mask


def _fmt(value) -> str:
    return "" if value is None else f"{value:g}"


def _assemble(trace, window, predict, sel: Selection, table: StepTable, requests, chosen,
              rp: Replay, summed: SummedSteps) -> Analysis:
    """Run the per-topic analyses on the selection and the kernel's results."""
    st, mask = sel.steps, sel.mask
    admitted = _in_range(requests["first_scheduled_step"], sel.step_range)
    tokens = Tokens(input=int(requests["prompt_tokens"][admitted].sum()),
                    cached_input=int(requests["cached_prompt_tokens"][admitted].sum()),
                    output=int(sel.of(rp.emitted).sum()), scheduled=int(st["total_tokens"].sum()))
    engine, run_kv = trace.run.get("engine", {}), trace.run.get("kv", {})
    done = requests if chosen.all() else Masked(requests, chosen)
    kv_result = kv(summed.blocks_used, table.counters, table.kv_capacity, run_kv, tokens.input,
                   tokens.cached_input, rp.recomputed)
    batch_result = summed.batch
    # the model's temporaries are the pass's largest: fitted before the forward rows are read
    model = _step_model(sel, rp, done, predict, kv_result, engine, batch_result,
                        tokens.output / sel.duration_s if sel.duration_s else 0.0)
    forward = _forward(trace, sel)
    seen, n_done = rp.requests_seen, int(chosen.sum())
    return Analysis(
        path=trace.path, format_version=trace.format_version, window_s=_window_bounds(window),
        duration_s=sel.duration_s, steps=int(mask.sum()), requests=seen,
        requests_finished=n_done, requests_unfinished=max(seen - n_done, 0), tokens=tokens,
        throughput=throughput(tokens, n_done, sel.duration_s, sel.span_ns, sel.origin_ns,
                              _events(sel, rp, requests, admitted, chosen)),
        latency=latency(done, rp.itl_values_ns, rp.itl_counts), batch=batch_result, kv=kv_result,
        memory=memory(summed.readings, forward.readings),
        step_time_model=model, device_time=forward.device_time,
        ranks=_ranks(trace, sel, forward),
        timeline_columns=_timeline_columns(sel, rp), plot_columns=lambda: _plot_columns(trace, sel),
        request_ids=lambda: _request_ids(trace),
        finished_rows=chosen, run=trace.run, warnings=list(trace.warnings),
        host_time=_host_time(trace, sel, forward), span_ns=sel.span_ns)


def _forward(trace, sel: Selection) -> ForwardSummary:
    """The forward table summed in one pass; its rows kept only for host time, or for
    the ranks of a table already in memory (read there a second time when it has several)."""
    def run(keep: bool) -> ForwardSummary:
        return forward_pass(trace.batches("forward", FORWARD_COLUMNS), sel.step_range, keep,
                            trace.path)
    summary = run(_has_host_samples(trace))
    if summary.ranks_seen > 1 and summary.rows is None and "forward" not in trace.streams:
        summary = run(True)
    return summary


def _ranks(trace, sel: Selection, forward: ForwardSummary) -> Ranks | None:
    """Skew between ranks: from the kept rows, else merged from the workers' files."""
    if forward.ranks_seen < 2:
        return None
    if forward.rows is not None:
        return ranks(forward.rows, sel.step_range)
    files = getattr(trace.streams["forward"], "streams", [trace.streams["forward"]])
    sources = [(batch_columns([b], ROW_COLUMNS) for b in f.batches(ROW_COLUMNS)) for f in files]
    return streamed_ranks(sources, sel.step_range, forward.rank_ids, forward.on_device)


def _has_host_samples(trace) -> bool:
    return _has_host_tables(trace) and trace.tables["host_samples"].num_rows > 0


def _has_host_tables(trace) -> bool:
    return "host_samples" in trace.tables and "host_frames" in trace.tables


def _host_time(trace, sel: Selection, forward: ForwardSummary) -> HostTime | None:
    if not _has_host_tables(trace):
        return None
    rows = forward.rows or {name: np.empty(0, np.int64) for name in ROW_COLUMNS}
    forward = {name: rows[name] for name in ("step", "rank", "t_start_ns", "t_end_ns")}
    rate = (trace.end_records.get("engine_core", {}).get("py_spy") or {}).get("rate_hz")
    return host_time(trace["host_samples"], trace["host_frames"], sel.steps, forward, rate)


def _events(sel: Selection, rp: Replay, requests, admitted, chosen) -> dict:
    """(time ns, amount) of what throughput counts: tokens out, prompts in, requests done."""
    return {"output_tokens_per_s": (sel.steps["t_update_end_ns"], sel.of(rp.emitted)),
            "input_tokens_per_s": (requests["first_scheduled_ns"][admitted],
                                   requests["prompt_tokens"][admitted]),
            "requests_per_s": (requests["finish_ns"][chosen], np.ones(int(chosen.sum())))}


def _window_bounds(window) -> tuple[float, float] | None:
    if window is None:
        return None
    return (window[0] if window[0] is not None else 0.0,
            window[1] if window[1] is not None else float("inf"))


def _step_model(sel: Selection, rp: Replay, done, predict, kv_result: KV, engine, batch_result,
                measured_output_rate) -> StepModel:
    """Fit on the selected steps that scheduled tokens (their cycle: schedule start to the
    next schedule start); predict for the finished requests' workload. The samples go
    before the predictions' schedules are simulated: both are as long as a day."""
    st = sel.steps
    fitted = fit(step_samples(st["t_schedule_start_ns"], st["total_tokens"] > 0,
                              st["num_decode_reqs"], st["prefill_tokens"], sel.of(rp.context),
                              int(batch_result.max_running or 0)))
    requests = Requests(done["prompt_tokens"], done["cached_prompt_tokens"], done["output_tokens"])
    limits = {"token_budget": engine.get("max_num_batched_tokens"),
              "block_size": kv_result.block_size, "blocks_total": kv_result.blocks_total}
    ran = engine.get("max_num_seqs") or batch_result.max_running
    return fitted_model(fitted, requests, limits, tuple(predict),
                      observed=(int(ran), measured_output_rate) if ran else None)


def _request_ids(trace) -> pa.ChunkedArray:
    return pa.chunked_array([b.column(0) for b in trace.batches("requests", ("request_id",))],
                            pa.string())


def _timeline_columns(sel: Selection, rp: Replay) -> dict:
    """What ``Analysis.timeline`` is made of (references, no copies), but PLOT_ONLY's."""
    st = sel.steps
    return {"step": st["step"], "origin_ns": sel.origin_ns,
            "t_schedule_start_ns": st["t_schedule_start_ns"], "t_update_end_ns": st["t_update_end_ns"],
            "decode_requests": st["num_decode_reqs"],
            "prefill_tokens": st["prefill_tokens"], "total_tokens": st["total_tokens"],
            "context_tokens": sel.of(rp.context), "output_tokens": sel.of(rp.emitted)}


def _plot_columns(trace, sel: Selection) -> dict:
    """PLOT_ONLY's columns at the selected steps, read again from the steps table."""
    names = tuple(PLOT_ONLY)
    columns = batch_columns(trace.batches("steps", names), names)
    return {PLOT_ONLY[name]: sel.of(values) for name, values in columns.items()}
