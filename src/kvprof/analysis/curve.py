"""Memory versus batch size: slopes per added sequence, slope changes that are real, and why.

Pure NumPy, nothing printed. ``explain_points`` reads one series (``kvprof curve``: a
total measured elsewhere); ``explain_sweep`` reads every component of a traced sweep
(``kvprof sweep``) and joins each slope change with the per-run facts that explain it.

Why per added sequence: batch sizes are usually spaced geometrically (1, 4, 8, 16, ...),
so each listed row adds more sequences than the one before, and per-row increments
grow even when every sequence costs the same. Only delta bytes / delta batch size
says whether memory accelerates.

The fit and the test of a slope change live in ``curve_fit``, the causes of a slope
change in ``curve_causes``, the wording in ``curve_words``; this module puts them
together into the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvprof.analysis.curve_causes import Evidence, attribute, capacity_facts
from kvprof.analysis.curve_fit import (Breakpoint, Segment, Series, SeriesResult, analyse_series,
                                       make_series)
from kvprof.analysis.curve_words import (Units, breakpoint_words, count_text, describe_slopes,
                                         dtype_words, joined, params_number, params_words,
                                         units_for)
from kvprof.errors import UsageError

ROW_GROWTH = 1.15             # a per-row increment this much above the previous one "grows"
ROUNDING_SLACK = 1.25         # block slots / tokens held above this: whole blocks cost a lot

CAUSES = {
    "kv_context_growth": "KV blocks in use grow linearly with the tokens the sequences hold",
    "kv_capacity_limit": "KV blocks in use reached the usable pool: preemption, admission stalls",
    "block_rounding": "each sequence pays whole KV blocks, far more slots than tokens held",
    "prefix_sharing": "sequences share prefix blocks, so blocks in use per sequence fall",
    "token_budget_saturated": "scheduled tokens per step hit max_num_batched_tokens",
    "cudagraph_padding": "the batch is padded up to the next CUDA-graph capture size",
    "allocator_reserve_growth": "torch's allocator reserve (reserved - allocated) grows",
    "batch_not_filled": "fewer sequences ran than max_num_seqs allowed (too few requests)",
    "spacing_artifact": "per-row increments grow only because each row adds more sequences",
}

COMPONENTS = {
    "weights": "model weights",
    "kv_pool_reserved": "KV pool reserved at start-up",
    "kv_in_use_peak": "peak KV blocks in use x bytes per block",
    "kv_in_use_mean": "mean KV blocks in use x bytes per block",
    "activation_workspace": "activation / workspace memory of the forward",
    "allocator_reserve": "torch allocator reserve (reserved - allocated)",
    "non_torch": "memory outside torch's allocator",
    "engine_process": "EngineCore process RSS",
    "total": "total memory",
}


# ------------------------------------------------------------------------ the data
@dataclass
class SweepPoint:
    """One batch size of a sweep: component -> bytes per round, and per-run facts."""

    batch_size: int
    components: dict[str, list[float | None]]
    evidence: dict = field(default_factory=dict)


@dataclass
class Finding:
    """Something the explanation states that is not a slope change: an artifact, a cost."""

    cause: str
    component: str
    text: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CurveReport:
    segments: list[Segment]
    breakpoints: list[Breakpoint]
    explanation: str
    warnings: list[str]
    causes: list[str]
    findings: list[Finding]
    unit: tuple[str, float]
    main: SeriesResult | None = None
    components: dict[str, SeriesResult] | None = None
    device: str | None = None

    def to_dict(self) -> dict:
        out = {
            "segments": [s.to_dict() for s in self.segments],
            "breakpoints": [b.to_dict() for b in self.breakpoints],
            "explanation": self.explanation,
            "warnings": list(self.warnings),
            "causes": list(self.causes),
            "findings": [f.to_dict() for f in self.findings],
            "unit": {"name": self.unit[0], "bytes": self.unit[1]},
            "points": self.main.to_dict()["points"] if self.main else [],
            "fit": self.main.fit.to_dict() if self.main and self.main.fit else None,
            "device": self.device,
        }
        if self.components is not None:
            out["components"] = {name: {**r.to_dict(), "unit_note": unit_note(name)}
                                 for name, r in self.components.items()}
        return out


def unit_note(component: str) -> str:
    return (f"{COMPONENTS.get(component, component)}; bytes, mean over rounds; slopes in bytes "
            f"per added sequence (batch size = max_num_seqs)")


# ------------------------------------------------------------------------ words
def spacing_finding(result: SeriesResult, u: Units) -> Finding | None:
    """Rows whose increment grows while the per-sequence slope does not rise: not at a
    real rising slope change when the curve was fitted, not by more than ROW_GROWTH otherwise."""
    segs = result.segments
    if len(segs) < 2:
        return None
    real = {b.bs for b in result.breakpoints if b.significant and b.change_per_seq > 0}

    def flat_or_falling(i: int) -> bool:
        if result.fit is not None:
            return segs[i].from_bs not in real
        return segs[i].slope_per_seq <= ROW_GROWTH * segs[i - 1].slope_per_seq

    artifacts = [i for i in range(1, len(segs))
                 if segs[i].delta_bytes > max(ROW_GROWTH * segs[i - 1].delta_bytes, 0)
                 and flat_or_falling(i)]
    if not artifacts:
        return None
    raw_rise = any(segs[i].slope_per_seq > segs[i - 1].slope_per_seq for i in artifacts)
    where = ", ".join(f"{segs[i].from_bs}\u2192{segs[i].to_bs}" for i in artifacts)
    deltas = joined([s.delta_bytes for s in segs], lambda v: u.main(v, True))
    slopes = ", ".join(f"{u.main(segs[i - 1].slope_per_seq)} \u2192 {u.main(segs[i].slope_per_seq)}"
                       for i in artifacts)
    text = (f"Per listed row the increase grows ({deltas}) only because each row adds more "
            f"sequences than the one before ({joined([s.added_seqs for s in segs], str)}); per "
            f"added sequence the slope does not rise{' beyond noise' if raw_rise else ''} where "
            f"the rows grow ({where}: {slopes} per sequence). That is an artifact of the "
            f"batch-size spacing, not an acceleration.")
    return Finding("spacing_artifact", result.series.name, text)


# ------------------------------------------------------------------------ kvprof curve
def explain_points(batch_sizes, memory_bytes, *, replicates=None, params=None, dtype_bytes=None,
                   unit: str | None = None) -> CurveReport:
    """One memory series measured elsewhere (nvidia-smi, a published table).

    ``memory_bytes[i]`` is the reading at ``batch_sizes[i]``; ``replicates[i]``, when given,
    lists that batch size's per-round readings (it replaces ``memory_bytes[i]``). Repeated
    batch sizes are rounds too. ``unit``: "GB", "MiB" or None (chosen by size) for the words.
    """
    pairs = []
    for i, bs in enumerate(batch_sizes):
        values = replicates[i] if replicates is not None and replicates[i] else [memory_bytes[i]]
        pairs += [(bs, v) for v in values]
    series = make_series("total", pairs)
    if series.x.size == 0:
        raise UsageError("no (batch size, memory) points to analyse")
    result = analyse_series(series)
    u = units_for(series, unit)
    warnings = _point_warnings(result, u, params, dtype_bytes)
    findings = [f for f in (spacing_finding(result, u),) if f]
    lines = _curve_lines(result, u)
    lines += [f.text for f in findings]
    if not any(b.significant and b.change_per_seq > 0 for b in result.breakpoints) and result.fit:
        lines.append("Nothing in these readings grows faster than linearly with the batch size: a "
                     "KV cache that grew quadratically would make the slope per added sequence "
                     "rise. Under PagedAttention KV memory is linear in the tokens held.")
    if any(b.significant for b in result.breakpoints):
        lines.append("One series of totals cannot tell which component changed slope; "
                     "'kvprof sweep' measures each component.")
    lines += warnings
    return CurveReport(result.segments, result.breakpoints, "\n".join(lines), warnings,
                       _causes([result], findings), findings, (u.name, u.size), main=result)


def _curve_lines(result: SeriesResult, u: Units) -> list[str]:
    s = result.series
    x, y = s.x, s.means
    rounds = int(s.counts.max())
    lines = [f"{result.series.name.capitalize()} memory goes from {u.main(y[0])} at batch size "
             f"{int(x[0])} to {u.main(y[-1])} at batch size {int(x[-1])}"
             + (f": {u.main(result.overall_slope())} per added sequence overall"
                if x.size > 1 else "")
             + (f" (mean of up to {rounds} rounds)." if rounds > 1 else ".")]
    if x.size > 1:
        lines.append(describe_slopes(result.segments, u))
    if result.fit is None:
        lines.append(f"{x.size} batch sizes: at least 3 are needed to test a slope change.")
    elif not result.breakpoints:
        lines.append("One straight line fits these points: no breakpoint.")
    for b in result.breakpoints:
        lines.append(breakpoint_words(b, u, result.series.name))
    return lines


def _point_warnings(result: SeriesResult, u: Units, params, dtype_bytes) -> list[str]:
    y = result.series.means
    out = []
    if params and dtype_bytes:
        out += _weights_check(result.series, u, float(params), float(dtype_bytes))
    growth = float(y[-1] - y[0])
    base = abs(float(y[0])) or 1.0
    pool = ("vLLM reserves its KV pool at start-up (gpu_memory_utilization of the device), so "
            "a device-level reading such as nvidia-smi's barely moves with the batch size")
    if abs(growth) > 0.05 * base:
        out.append(f"{pool}; these readings grow by {u.main(growth)} ({100 * growth / base:.0f} %) "
                   f"from batch size {int(result.series.x[0])} to {int(result.series.x[-1])}, so "
                   f"they measure something else (torch's allocated memory, a process, a "
                   f"different engine or setting), not the device memory vLLM holds.")
    else:
        out.append(f"{pool}; these readings move by {100 * growth / base:.1f} %, as expected if "
                   f"they are device-level: they say little about what the batch uses.")
    return out


def _weights_check(series: Series, u: Units, params: float, dtype_bytes: float) -> list[str]:
    weights = params * dtype_bytes
    y = series.means
    model = f"a {params_words(params)} model in {dtype_words(dtype_bytes)}"
    head = f"{params_number(params)} parameters x {dtype_bytes:g} bytes = {u.main(weights)} of weights"
    if weights > y.max():
        return [f"{head}, more than every reading (max {u.main(y.max())}): the readings cannot "
                f"include the weights of {model} on one device \u2014 quantised, sharded across "
                f"devices, or not the same measurement."]
    if weights > y.min():
        below = [int(b) for b, v in zip(series.x, y) if v < weights]
        return [f"{head}, more than the readings at batch sizes {joined(below, str)}: those "
                f"readings cannot include the weights of {model} on one device."]
    return []


def _causes(results, findings) -> list[str]:
    found = {b.cause for r in results for b in r.breakpoints if b.significant and b.cause}
    found |= {f.cause for f in findings}
    return [c for c in CAUSES if c in found]


# ------------------------------------------------------------------------ kvprof sweep
def explain_sweep(points: list[SweepPoint]) -> CurveReport:
    """Every component of a sweep; the top-level segments and breakpoints are the total's."""
    if not points:
        raise UsageError("no sweep points to analyse")
    ev = Evidence(points)
    names = [n for n in (*COMPONENTS, *sorted({c for p in points for c in p.components}))
             if any(v is not None for p in points for v in p.components.get(n, []))]
    names = list(dict.fromkeys(names))
    results = {n: analyse_series(make_series(n, [(p.batch_size, v) for p in points
                                                 for v in p.components.get(n, [])]))
               for n in names}
    results = {n: r for n, r in results.items() if r.series.x.size}
    main_name = "total" if "total" in results else next(iter(results), None)
    warnings = []
    if main_name is None:
        raise UsageError("the sweep points hold no memory reading")
    if main_name != "total":
        warnings.append(f"no 'total' series: the top level shows {main_name}")
    u = units_for(results[main_name].series, None)
    for name, r in results.items():
        for b in r.breakpoints:
            if b.significant:
                attribute(b, r, results, ev, u)
    findings = _sweep_findings(results, ev, u, main_name)
    main = results[main_name]
    if main.series.x.size < 3:
        warnings.append(f"{main.series.x.size} batch sizes: at least 3 are needed to test a "
                        f"slope change")
    lines = _sweep_lines(results, main_name, ev, u, findings)
    return CurveReport(main.segments, main.breakpoints, "\n".join(lines + warnings), warnings,
                       _causes(results.values(), findings), findings, (u.name, u.size),
                       main=main, components=results, device=ev.first("device"))


# ------------------------------------------------------------------------ sweep findings
def _sweep_findings(results: dict, ev: Evidence, u: Units, main_name: str) -> list[Finding]:
    out = []
    spacing = spacing_finding(results[main_name], u)
    if spacing:
        out.append(spacing)
    kv = results.get("kv_in_use_peak") or results.get("kv_in_use_mean")
    if kv is not None and kv.series.x.size > 1:
        out += _kv_findings(kv, ev, u)
        named = any(b.cause == "kv_capacity_limit" and b.significant
                    for r in results.values() for b in r.breakpoints)
        if not named:
            out += _capacity_finding(kv, ev, u)
    return out


def _capacity_finding(kv: SeriesResult, ev: Evidence, u: Units) -> list[Finding]:
    """A full pool is a fact of the runs, even where too few points test a slope change."""
    full = [int(bs) for bs in kv.series.x if capacity_facts([bs], ev)]
    if not full:
        return []
    facts = "; ".join(capacity_facts(full, ev))
    segs = [s for s in kv.segments if s.to_bs <= full[0]][-1:] + \
           [s for s in kv.segments if s.from_bs >= full[0]][:1]
    slopes = ", ".join(f"{u.auto(s.slope_per_seq)} ({s.from_bs}\u2192{s.to_bs})" for s in segs)
    return [Finding("kv_capacity_limit", kv.series.name, (
        f"The KV pool was full from batch size {full[0]} ({facts}): KV blocks in use cannot "
        f"grow past the pool, so requests are preempted or wait instead"
        + (f"; {kv.series.name} per added sequence: {slopes}" if segs else "") + "."))]


def _kv_findings(kv: SeriesResult, ev: Evidence, u: Units) -> list[Finding]:
    x = kv.series.x
    bpb = ev.mean("bytes_per_block", x)
    bps = ev.mean("mean_blocks_per_seq", x)
    tokens = ev.mean("mean_context_tokens", x)
    size = ev.mean("block_size", x)
    slope = _first_piece_slope(kv)
    if not (bpb and bps and slope and slope > 0):
        return []
    per_seq = bps * bpb
    text = (f"KV blocks in use ({kv.series.name}) grow by {u.auto(slope)} per added sequence"
            + (" before the first slope change" if any(b.significant for b in kv.breakpoints) else "")
            + f"; the sequences held on average {bps:.2f} blocks of {u.auto(bpb)}"
            + (f" ({count_text(tokens)} tokens, {u.auto(bpb / size)} per token)" if tokens and size else "")
            + f" = {u.auto(per_seq)} per sequence. Under PagedAttention KV memory is linear in "
              f"the tokens held, not quadratic.")
    out = [Finding("kv_context_growth", kv.series.name, text)]
    if tokens and size and bps * size > ROUNDING_SLACK * tokens:
        slots = bps * size
        out.append(Finding("block_rounding", kv.series.name, (
            f"Each sequence pays whole blocks: {count_text(tokens)} tokens held on average take "
            f"{bps:.2f} blocks x {count_text(size)} = {count_text(slots)} token slots "
            f"({100 * (1 - tokens / slots):.0f} % of them empty).")))
    return out


def _first_piece_slope(r: SeriesResult) -> float | None:
    if r.fit is None:
        return r.overall_slope()
    first_real = next((b for b in r.breakpoints if b.significant), None)
    if first_real is None:
        x, y = r.series.x, r.series.means
        return float(np.polyfit(x, y, 1)[0])
    return first_real.slope_before


def _sweep_lines(results: dict, main_name: str, ev: Evidence, u: Units,
                 findings: list[Finding]) -> list[str]:
    main = results[main_name]
    lines = _curve_lines(main, u)
    device = ev.first("device")
    pool = results.get("kv_pool_reserved")
    if pool is not None:
        y = pool.series.means
        moves = float(y.max() - y.min())
        lines.append(f"vLLM reserved its KV pool at start-up: kv_pool_reserved is {u.auto(y[0])} "
                     + ("at every batch size" if moves <= 0.01 * max(abs(y).max(), 1.0)
                        else f"to {u.auto(y[-1])}")
                     + (" (on the CPU backend, a share of host memory)" if device == "cpu" else "")
                     + ", so the pool itself does not grow with the batch; what grows is the "
                       "part of it in use (kv_in_use_*), activations and the allocator reserve.")
    explained: dict = {}
    for name, r in results.items():
        if name == main_name:
            continue
        lines.append(_component_line(r, u))
        for b in (b for b in r.breakpoints if b.significant):
            first = explained.setdefault((b.cause, b.bs), name) if b.cause else name
            lines.append(breakpoint_words(b, u, name, u.auto, same_as=first if first != name else None))
    lines += [f.text for f in findings]
    return lines


def _component_line(r: SeriesResult, u: Units) -> str:
    y = r.series.means
    slope = r.overall_slope()
    if slope is None:
        return f"{r.series.name}: {u.auto(y[0])} (one batch size)."
    real = sum(b.significant for b in r.breakpoints)
    flat = abs(y[-1] - y[0]) <= 0.01 * max(float(np.max(np.abs(y))), 1.0)
    return (f"{r.series.name}: {u.auto(y[0])} \u2192 {u.auto(y[-1])}"
            + (" (flat)" if flat else f", {u.auto(slope, True)} per added sequence overall")
            + (f", {real} real slope change{'s' if real > 1 else ''}" if real else "") + ".")
