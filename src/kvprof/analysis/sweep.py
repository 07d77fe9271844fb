"""The batch-size study from its traces: the study's three tables and the memory curve.

Pure: traces in, dataclasses out. Each round's trace is analysed on its own
(``analyze``); rounds of one batch size are then combined (mean and spread), and
the memory components of every batch size go to the curve analysis
(``curve.explain_sweep``), which finds and explains the changes of slope.

Which memory each component is depends on the device; ``COMPONENT_NOTES`` says it
and the report prints it next to the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvprof.analysis import Analysis, analyze
from kvprof.analysis.predict import source_from_trace
from kvprof.analysis.sweep_model import sweep_model

COMPONENTS = ("weights", "kv_pool_reserved", "kv_in_use_peak", "kv_in_use_mean",
              "activation_workspace", "allocator_reserve", "non_torch", "engine_process", "total")

COMPONENT_NOTES = {
    "cpu": {
        "weights": "bytes of the model's weights in the worker: its parameters, and linear "
                   "weights the backend repacked into its kernels' buffers counted at their "
                   "shapes (measured once at trace start)",
        "kv_pool_reserved": "KV tensors allocated at start-up (vLLM reserves the whole pool "
                            "before the first request, so this does not grow with batch size)",
        "kv_in_use_peak": "peak KV blocks in use x bytes per block (KV accounting, every step)",
        "kv_in_use_mean": "mean KV blocks in use x bytes per block over the run's steps",
        "activation_workspace": "growth of the worker's RSS during the run over its RSS when "
                                "tracing started on that engine (activations, workspace and what "
                                "the C allocator keeps: not separable on a CPU)",
        "allocator_reserve": "not measurable on a CPU (included in activation_workspace)",
        "non_torch": "worker RSS at trace start minus weights and KV pool "
                     "(Python, torch and vLLM runtime)",
        "engine_process": "peak RSS of the EngineCore process (scheduler, request bookkeeping)",
        "total": "peak worker RSS + peak EngineCore RSS (resident memory of the engine's processes)",
    },
    "cuda": {
        "weights": "bytes of the model's weights in the worker: its parameters, and linear "
                   "weights the backend repacked into its kernels' buffers counted at their "
                   "shapes (measured once at trace start)",
        "kv_pool_reserved": "KV tensors allocated at start-up (vLLM reserves the whole pool "
                            "before the first request, so this does not grow with batch size)",
        "kv_in_use_peak": "peak KV blocks in use x bytes per block (KV accounting, every step)",
        "kv_in_use_mean": "mean KV blocks in use x bytes per block over the run's steps",
        "activation_workspace": "torch allocator peak allocated minus weights and KV pool "
                                "(activations and workspace; the peak since the worker started, "
                                "so it includes vLLM's start-up profiling run)",
        "allocator_reserve": "peak of torch reserved minus allocated (cached, not in use)",
        "non_torch": "peak of NVML device memory used minus torch reserved (CUDA context, "
                     "NCCL, CUDA graphs' private pools)",
        "engine_process": "peak RSS of the EngineCore process (host memory, not on the device)",
        "total": "peak NVML device memory used (what nvidia-smi shows)",
    },
}


@dataclass
class RoundMeasure:
    """What one traced round measured."""

    batch_size: int
    round_index: int
    trace: str
    output_tokens_per_s: float
    mean_e2e_ms: float
    mean_ttft_ms: float | None
    mean_tpot_ms: float | None
    mean_queue_ms: float | None
    device: str
    capacity_bytes: int | None
    components: dict[str, float | None]
    evidence: dict
    warnings: list[str] = field(default_factory=list)
    worker_rss_at_start: float | None = None    # the CPU baseline of activation_workspace
    source: object = field(default=None, repr=False)   # predict.Source: the step-time model's data
    engine: int | None = None    # which engine ran it; None: one engine per batch size


def measure_round(trace, batch_size: int, round_index: int, engine: int | None = None) -> RoundMeasure:
    """Analyse one round's trace into the numbers the study tables and the curve need."""
    result = analyze(trace)
    report = result.to_dict()
    lat = report["latency_ms"]
    device, capacity = device_and_capacity(trace.run)
    return RoundMeasure(
        batch_size=batch_size, round_index=round_index, trace=trace.path,
        output_tokens_per_s=report["throughput"]["output_tokens_per_s"],
        mean_e2e_ms=lat["e2e"]["mean"], mean_ttft_ms=lat["ttft"]["mean"],
        mean_tpot_ms=lat["tpot"]["mean"], mean_queue_ms=lat["queue"]["mean"],
        device=device, capacity_bytes=capacity,
        components=memory_components(trace, result, device),
        evidence=evidence(trace, result, device),
        warnings=list(result.warnings),
        worker_rss_at_start=_sum_known(w.get("rss_at_start_bytes") for w in trace.run.get("workers") or []),
        source=source_from_trace(trace), engine=engine)


def rebase_rounds(rounds: list[RoundMeasure]) -> None:
    """Later rounds reuse the engine, so their RSS at trace start already holds what
    earlier rounds grew: measure every round's CPU growth from the first round's start."""
    starts = [r.worker_rss_at_start for r in rounds if r.worker_rss_at_start is not None]
    if not starts or any(r.device != "cpu" for r in rounds):
        return
    base = min(starts)
    for r in rounds:
        c = r.components
        if r.worker_rss_at_start is None or c.get("activation_workspace") is None:
            continue
        c["activation_workspace"] += r.worker_rss_at_start - base
        if c.get("non_torch") is not None:
            c["non_torch"] -= r.worker_rss_at_start - base
        r.worker_rss_at_start = base


def device_and_capacity(run: dict) -> tuple[str, int | None]:
    """'cuda' with the device's total memory, or 'cpu' with the host's."""
    workers = run.get("workers") or [{}]
    if any(w.get("cuda") for w in workers):
        totals = [w.get("device_total_bytes") for w in workers]
        return "cuda", (sum(totals) if all(totals) else None)
    return "cpu", (run.get("hardware") or {}).get("memory_bytes")


def memory_components(trace, result: Analysis, device: str) -> dict[str, float | None]:
    """Bytes per component (COMPONENT_NOTES says which memory each is)."""
    readings = result.memory.readings
    kv_meta = trace.run.get("kv") or {}
    workers = trace.run.get("workers") or []
    weights = _sum_known(w.get("weights_bytes") for w in workers)
    pool = kv_meta.get("kv_tensor_bytes")
    out = {"weights": weights, "kv_pool_reserved": pool,
           "kv_in_use_peak": readings["kv_in_use_bytes"].max,
           "kv_in_use_mean": readings["kv_in_use_bytes"].mean,
           "engine_process": readings["engine_rss_bytes"].max}
    if device == "cuda":
        out.update(_cuda_components(trace, readings, weights, pool))
    else:
        out.update(_cpu_components(readings, workers, weights, pool))
    return {name: (None if out.get(name) is None else float(out[name])) for name in COMPONENTS}


def _cpu_components(readings, workers, weights, pool) -> dict:
    worker_peak = readings["worker_rss_bytes"].max
    start = _sum_known(w.get("rss_at_start_bytes") for w in workers)
    engine_peak = readings["engine_rss_bytes"].max
    out = {"allocator_reserve": None}
    if worker_peak is not None and start is not None:
        out["activation_workspace"] = max(0, worker_peak - start)
        if weights is not None and pool is not None:
            out["non_torch"] = max(0, start - weights - pool)
    if worker_peak is not None and engine_peak is not None:
        out["total"] = worker_peak + engine_peak
    return out


def _cuda_components(trace, readings, weights, pool) -> dict:
    forward = trace["forward"]

    def peak_difference(column: str, minus: str):
        values = (forward.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
                  - forward.column(minus).to_numpy(zero_copy_only=False).astype(np.float64))
        values = values[~np.isnan(values)]
        return float(values.max()) if values.size else None

    torch_peak = readings["torch_peak_bytes"].max
    out = {"allocator_reserve": peak_difference("torch_reserved_bytes", "torch_allocated_bytes"),
           "non_torch": peak_difference("gpu_used_bytes", "torch_reserved_bytes"),
           "total": readings["gpu_used_bytes"].max}
    if torch_peak is not None and weights is not None and pool is not None:
        out["activation_workspace"] = max(0.0, torch_peak - weights - pool)
    return out


def evidence(trace, result: Analysis, device: str) -> dict:
    """Facts that tell the causes of a slope change apart (see curve.py)."""
    batch, kv = result.batch, result.kv
    used = trace["steps"].column("kv_blocks_used").to_numpy().astype(np.float64)
    running = trace["steps"].column("num_running").to_numpy().astype(np.float64)
    busy = running > 0
    rows = trace["request_steps"]
    context = (rows.column("computed").to_numpy().astype(np.int64)
               + rows.column("tokens").to_numpy().astype(np.int64))
    engine = trace.run.get("engine") or {}
    kv_meta = trace.run.get("kv") or {}
    sharing = prefix_sharing(trace, kv_meta.get("block_size"))
    return {
        **sharing,
        "peak_running": batch.max_running, "mean_running": batch.mean_running,
        "preemptions": kv.preemptions, "kv_blocks_usable": kv.blocks_total,
        "kv_peak_blocks": kv.peak_blocks_used, "bytes_per_block": kv.bytes_per_block,
        "block_size": kv_meta.get("block_size"),
        "mean_context_tokens": float(context.mean()) if context.size else None,
        "mean_blocks_per_seq": float((used[busy] / running[busy]).mean()) if busy.any() else None,
        "token_budget": engine.get("max_num_batched_tokens"),
        "budget_saturated_share": batch.steps_at_token_budget,
        "cudagraph_capture_sizes": list(engine.get("cudagraph_capture_sizes") or []),
        "waiting_peak": batch.max_waiting, "device": device,
    }


def prefix_sharing(trace, block_size: int | None) -> dict:
    """How much concurrent sequences share KV blocks (prefix-cached blocks held once).

    Each request row of a step needs ceil(tokens held / block size) blocks of its own;
    the blocks in use after the step are fewer when sequences share prefix blocks.
    ``kv_sharing`` = 1 - sum(used) / sum(needed alone), over the steps with rows. Rows
    of a request's last step are left out: its blocks are freed by the step's end.
    """
    rows = trace["request_steps"]
    if not block_size or rows.num_rows == 0:
        return {"kv_sharing": None, "mean_unshared_blocks_per_seq": None}
    held = rows.column("computed").to_numpy().astype(np.int64) + rows.column("tokens").to_numpy()
    step = rows.column("step").to_numpy().astype(np.int64)
    finish_step = _finish_steps(trace)
    req = rows.column("req").to_numpy().astype(np.int64)
    alive = finish_step[req] != step
    held, step = held[alive], step[alive]
    steps = trace["steps"]
    numbers = steps.column("step").to_numpy().astype(np.int64)
    used = steps.column("kv_blocks_used").to_numpy().astype(np.float64)
    size = int(max(step.max(), numbers.max())) + 1
    needed = np.bincount(step, weights=-(-held // block_size), minlength=size)[numbers]
    seqs = np.bincount(step, minlength=size)[numbers]
    busy = seqs > 0
    if not busy.any():
        return {"kv_sharing": None, "mean_unshared_blocks_per_seq": None}
    return {"kv_sharing": float(1 - used[busy].sum() / needed[busy].sum()),
            "mean_unshared_blocks_per_seq": float(needed[busy].sum() / seqs[busy].sum())}


def _finish_steps(trace) -> np.ndarray:
    """finish_step by req index (-1: unfinished)."""
    requests = trace["requests"]
    req = requests.column("req").to_numpy().astype(np.int64)
    out = np.full(int(req.max()) + 1 if req.size else 1, -1, np.int64)
    out[req] = requests.column("finish_step").to_numpy()
    return out


def _sum_known(values) -> float | None:
    values = [v for v in values if v is not None and v >= 0]
    return float(sum(values)) if values else None


@dataclass
class BatchSizeRuns:
    """All rounds of one batch size, combined: means, spread (min, max) over rounds."""

    batch_size: int
    rounds: list[RoundMeasure]

    def values(self, attr: str) -> list[float]:
        return [v for v in (getattr(r, attr) for r in self.rounds) if v is not None]

    def mean(self, attr: str) -> float | None:
        values = self.values(attr)
        return float(np.mean(values)) if values else None

    def spread(self, attr: str) -> list[float] | None:
        values = self.values(attr)
        return [float(min(values)), float(max(values))] if values else None

    def component_rounds(self, name: str) -> list[float | None]:
        return [r.components.get(name) for r in self.rounds]

    def component(self, name: str) -> float | None:
        values = [v for v in self.component_rounds(name) if v is not None]
        return float(np.mean(values)) if values else None

    def evidence(self) -> dict:
        """Mean over rounds of numeric facts; other facts from the first round."""
        combined = dict(self.rounds[0].evidence)
        for key, value in combined.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [r.evidence.get(key) for r in self.rounds]
                values = [v for v in values if v is not None]
                combined[key] = float(np.mean(values)) if values else None
        combined["preemptions"] = sum(r.evidence.get("preemptions") or 0 for r in self.rounds)
        combined["peak_running"] = max(r.evidence.get("peak_running") or 0 for r in self.rounds)
        return combined


@dataclass
class SweepReport:
    """The study's tables and the memory-curve analysis of one sweep."""

    runs: list[BatchSizeRuns]
    curve: object                        # curve.CurveReport
    device: str
    capacity_bytes: int | None
    plan: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    step_model: object = None            # sweep_model.SweepModel (None: no usable fit)

    @property
    def baseline(self) -> BatchSizeRuns:
        return self.runs[0]

    def to_dict(self) -> dict:
        """The JSON report of ``kvprof sweep --json`` (docs/sweep.md)."""
        runs = [self.run_dict(r) for r in self.runs]
        return {"report_version": "1.0", "plan": self.plan, "device": self.device,
                "capacity_bytes": self.capacity_bytes,
                "component_notes": COMPONENT_NOTES[self.device],
                "runs": runs, "throughput_notes": throughput_notes(runs, self.plan.get("prompts")),
                "latency_notes": latency_notes(runs),
                "step_time_model": self.step_model.to_dict() if self.step_model else None,
                "curve": self.curve.to_dict(), "warnings": list(self.warnings)}

    def run_dict(self, run: BatchSizeRuns) -> dict:
        base_tps = self.baseline.mean("output_tokens_per_s")
        base_e2e = self.baseline.mean("mean_e2e_ms")
        tps, e2e = run.mean("output_tokens_per_s"), run.mean("mean_e2e_ms")
        memory = {name: run.component(name) for name in COMPONENTS}
        pool = memory["kv_pool_reserved"]
        ev = run.evidence()
        return {
            "batch_size": run.batch_size, "rounds": len(run.rounds),
            "output_tokens_per_s": tps, "output_tokens_per_s_spread": run.spread("output_tokens_per_s"),
            "speedup": _ratio(tps, base_tps),
            "mean_e2e_ms": e2e, "mean_e2e_ms_spread": run.spread("mean_e2e_ms"),
            "e2e_increase": None if _ratio(e2e, base_e2e) is None else _ratio(e2e, base_e2e) - 1,
            "mean_ttft_ms": run.mean("mean_ttft_ms"), "mean_tpot_ms": run.mean("mean_tpot_ms"),
            "mean_queue_ms": run.mean("mean_queue_ms"),
            "peak_running": ev["peak_running"], "mean_running": ev.get("mean_running"),
            "preemptions": ev["preemptions"],
            "peak_memory_bytes": _max_known(run.component_rounds("total")),
            "capacity_share": _ratio(_max_known(run.component_rounds("total")), self.capacity_bytes),
            "kv_pool_share": _ratio(_max_known(run.component_rounds("kv_in_use_peak")), pool),
            "memory": memory,
            "memory_rounds": {name: run.component_rounds(name) for name in COMPONENTS},
            "evidence": ev,
            "traces": [r.trace for r in run.rounds],
        }


# Measured once per engine start: its rounds repeat one reading, they are not replicates
# (the curve's noise must then come from the spread between batch sizes, not rounds).
ONCE_PER_ENGINE = ("weights", "kv_pool_reserved", "non_torch")


def replicates(run: BatchSizeRuns, name: str) -> list[float | None]:
    values = run.component_rounds(name)
    return values[:1] if name in ONCE_PER_ENGINE and not fresh_engines(run.rounds) else values


def fresh_engines(rounds: list[RoundMeasure]) -> bool:
    """Whether each of these rounds ran on an engine of its own (``--engine-per-round``)."""
    engines = [r.engine for r in rounds]
    return len(rounds) > 1 and None not in engines and len(set(engines)) == len(engines)


def by_engine(rounds: list[RoundMeasure]) -> list[list[RoundMeasure]]:
    """The rounds grouped by the engine that ran them (one engine per batch size when unknown)."""
    groups: dict = {}
    for r in rounds:
        groups.setdefault((r.batch_size, r.engine), []).append(r)
    return list(groups.values())


def sweep_report(rounds: list[RoundMeasure], plan: dict | None = None) -> SweepReport:
    """Combine the rounds by batch size and run the curve analysis on the components."""
    from kvprof.analysis.curve import SweepPoint, explain_sweep
    by_size: dict[int, list[RoundMeasure]] = {}
    for r in sorted(rounds, key=lambda r: (r.batch_size, r.round_index)):
        by_size.setdefault(r.batch_size, []).append(r)
    for same_engine in by_engine(rounds):
        rebase_rounds(same_engine)
    runs = [BatchSizeRuns(bs, rs) for bs, rs in by_size.items()]
    points = [SweepPoint(run.batch_size, {name: replicates(run, name) for name in COMPONENTS},
                         run.evidence()) for run in runs]
    devices = {r.device for r in rounds}
    device = "cuda" if "cuda" in devices else "cpu"
    warnings = [f"bs={r.batch_size} round {r.round_index}: {w}" for r in rounds for w in r.warnings]
    model = sweep_model([r.source for r in rounds if r.source is not None],
                        fresh_engines=all(fresh_engines(rs) for rs in by_size.values()))
    return SweepReport(runs, explain_sweep(points), device, rounds[0].capacity_bytes,
                       dict(plan or {}), warnings, model)


def throughput_notes(runs: list[dict], prompts: int | None = None) -> list[str]:
    """What drives the throughput curve, step by step of the grid.

    In decode, output tokens/s ~ sequences running / time per output token of one
    sequence (TPOT), so each step's gain splits into a batch factor and a step-time
    factor; a batch that was not kept full is named with the facts that explain it.
    """
    notes = []
    for a, b in zip(runs, runs[1:]):
        if not (a["output_tokens_per_s"] and a["mean_running"] and a["mean_tpot_ms"]
                and b["mean_tpot_ms"]):
            continue
        batch = b["mean_running"] / a["mean_running"]
        slower = b["mean_tpot_ms"] / a["mean_tpot_ms"]
        gain = b["output_tokens_per_s"] / a["output_tokens_per_s"]
        notes.append(
            f"bs {a['batch_size']}→{b['batch_size']}: output tokens/s x{gain:.2f} ≈ mean running "
            f"{a['mean_running']:.1f}→{b['mean_running']:.1f} (x{batch:.2f}) over time per output "
            f"token {a['mean_tpot_ms']:.1f}→{b['mean_tpot_ms']:.1f} ms (x{slower:.2f})"
            + _unfilled(b, prompts) + ".")
    return notes


def latency_notes(runs: list[dict]) -> list[str]:
    """What drives the latency curve: each step's change of mean end-to-end latency split
    into time to first token (prefill and admission wait) and decode (end-to-end - TTFT)."""
    notes = []
    keys = ("mean_e2e_ms", "mean_ttft_ms", "mean_tpot_ms", "mean_queue_ms")
    for a, b in zip(runs, runs[1:]):
        if any(r[k] is None for r in (a, b) for k in keys):
            continue
        first = b["mean_ttft_ms"] - a["mean_ttft_ms"]
        decode = (b["mean_e2e_ms"] - b["mean_ttft_ms"]) - (a["mean_e2e_ms"] - a["mean_ttft_ms"])
        notes.append(
            f"bs {a['batch_size']}→{b['batch_size']}: end-to-end {_ms(first + decode)} = time to "
            f"first token {_ms(first)} (queue {a['mean_queue_ms']:.0f}→{b['mean_queue_ms']:.0f} ms) "
            f"+ decode {_ms(decode)} (TPOT {a['mean_tpot_ms']:.1f}→{b['mean_tpot_ms']:.1f} ms).")
    return notes


def _ms(value: float) -> str:
    return f"{value:+,.0f} ms".replace("-", "−")


def _unfilled(run: dict, prompts: int | None) -> str:
    """Why a run held fewer sequences than its batch size, from what it measured."""
    if run["mean_running"] >= 0.85 * run["batch_size"]:
        return ""
    why = []
    if run["preemptions"]:
        why.append(f"the KV pool filled ({run['preemptions']} preemptions)")
    if prompts and prompts < 4 * run["batch_size"]:
        why.append(f"{prompts} prompts for {run['batch_size']} slots: the closed loop drains "
                   f"while the last requests finish")
    if run["mean_queue_ms"] and run["mean_ttft_ms"] and run["mean_queue_ms"] > 0.2 * run["mean_ttft_ms"]:
        why.append(f"requests waited {run['mean_queue_ms']:.0f} ms on average for admission")
    reason = "; ".join(why) if why else "admission did not keep up"
    return (f"; the batch was not kept full ({run['mean_running']:.1f} of {run['batch_size']} "
            f"on average: {reason})")


def _ratio(a, b) -> float | None:
    return None if a is None or not b else float(a) / float(b)


def _max_known(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(max(values)) if values else None
