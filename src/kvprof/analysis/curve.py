"""Memory versus batch size: slopes per added sequence, slope changes that are real, and why.

Pure NumPy, nothing printed. ``explain_points`` reads one series (``kvprof curve``: a
total measured elsewhere); ``explain_sweep`` reads every component of a traced sweep
(``kvprof sweep``) and joins each slope change with the per-run facts that explain it.

Why per added sequence: batch sizes are usually spaced geometrically (1, 4, 8, 16, ...),
so each listed row adds more sequences than the one before, and per-row increments
grow even when every sequence costs the same. Only delta bytes / delta batch size
says whether memory accelerates.

The fit and the test of a slope change live in ``curve_fit``; this module turns
their results into causes and words.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kvprof.analysis.curve_fit import (MIN_RELATIVE_CHANGE, Breakpoint, Segment, Series,
                                       SeriesResult, design_matrix, analyse_series, make_series)
from kvprof.errors import UsageError

ROW_GROWTH = 1.15             # a per-row increment this much above the previous one "grows"
ROUNDING_SLACK = 1.25         # block slots / tokens held above this: whole blocks cost a lot
MIN_TOKEN_CHANGE = 0.10       # tokens held per sequence must move this much to explain a KV change
MIN_SHARING_CHANGE = 0.05     # kv_sharing must move this much to explain a KV change

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
AGGREGATES = ("total", "engine_process")
CONTRIBUTORS = ("kv_in_use_peak", "activation_workspace", "allocator_reserve", "non_torch",
                "weights", "kv_pool_reserved")
KV_COMPONENTS = ("kv_in_use_peak", "kv_in_use_mean")

DECIMAL = {"GB": 1e9, "MB": 1e6, "kB": 1e3}
BINARY = {"GiB": 2.0**30, "MiB": 2.0**20, "KiB": 2.0**10}


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


# ------------------------------------------------------------------------ the fit


# ------------------------------------------------------------------------ statistics


# ------------------------------------------------------------------------ words
class Units:
    """Bytes in words: a fixed unit for the main series, auto-scaled for components."""

    def __init__(self, name: str, size: float, family: dict):
        self.name, self.size, self.family = name, size, family

    def main(self, value: float, signed: bool = False) -> str:
        return _number(value / self.size, signed) + f" {self.name}"

    def auto(self, value: float, signed: bool = False) -> str:
        if abs(value) < 0.5:
            return "0 bytes"
        for name, size in self.family.items():
            if abs(value) >= size:
                return _number(value / size, signed) + f" {name}"
        return _number(value, signed) + " bytes"


def _number(value: float, signed: bool) -> str:
    if value == 0:
        return "0"
    text = f"{value:#.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    text = text.rstrip(".")
    return ("+" + text) if signed and value > 0 else text.replace("-", "\u2212")


def units_for(series: Series, unit: str | None) -> Units:
    """The input's unit when given, else one that shows the per-row changes well."""
    deltas = np.abs(np.diff(series.means))
    scale = float(deltas.max()) if deltas.size and deltas.max() > 0 else float(np.max(np.abs(series.means)))
    return choose_units(scale, unit)


def choose_units(largest: float, unit: str | None) -> Units:
    if unit == "GB":
        return Units("GB", 1e9, DECIMAL)
    if unit == "MiB":
        return Units("MiB", 2.0**20, BINARY)
    for name, size in BINARY.items():
        if largest >= size:
            return Units(name, size, BINARY)
    return Units("bytes", 1.0, BINARY)


def _list(values, fmt) -> str:
    return ", ".join(fmt(v) for v in values)


def _count(value: float) -> str:
    return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 else f"{value:,.1f}"


def describe_slopes(segs: list[Segment], u: Units) -> str:
    """The per-sequence slopes step by step, and their trend."""
    if not segs:
        return ""
    slopes = [s.slope_per_seq for s in segs]
    listed = ", ".join(f"{u.main(s.slope_per_seq)} ({s.from_bs}\u2192{s.to_bs})" for s in segs)
    if len(slopes) > 1 and all(b < a for a, b in zip(slopes, slopes[1:])):
        trend = "falls at every step"
    elif len(slopes) > 1 and all(b > a for a, b in zip(slopes, slopes[1:])):
        trend = "rises at every step"
    elif _about_constant(slopes):
        trend = "stays about the same"
    else:
        trend = "changes from step to step"
    return f"Per added sequence the slope {trend}: {listed} per sequence."


def _about_constant(slopes) -> bool:
    top = max(abs(s) for s in slopes)
    return top == 0 or (max(slopes) - min(slopes)) <= MIN_RELATIVE_CHANGE * top


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
    deltas = _list([s.delta_bytes for s in segs], lambda v: u.main(v, True))
    slopes = ", ".join(f"{u.main(segs[i - 1].slope_per_seq)} \u2192 {u.main(segs[i].slope_per_seq)}"
                       for i in artifacts)
    text = (f"Per listed row the increase grows ({deltas}) only because each row adds more "
            f"sequences than the one before ({_list([s.added_seqs for s in segs], str)}); per "
            f"added sequence the slope does not rise{' beyond noise' if raw_rise else ''} where "
            f"the rows grow ({where}: {slopes} per sequence). That is an artifact of the "
            f"batch-size spacing, not an acceleration.")
    return Finding("spacing_artifact", result.series.name, text)


def _statistic(t: float) -> str:
    """A t value; beyond 10,000 (rounds that agree to the byte) as a power of ten."""
    return _number(t, False) if abs(t) < 1e4 else f"{t:.0e}".replace("-", "\u2212")


def breakpoint_words(b: Breakpoint, u: Units, name: str, fmt=None, same_as: str | None = None) -> str:
    fmt = fmt or u.main
    verb = "rises" if b.change_per_seq > 0 else "falls"
    stat = "" if b.statistic is None else f", t = {_statistic(b.statistic)}"
    verdict = ("a real change" if b.significant else
               "within noise or too small to count" if b.statistic is not None else
               "too few points to test")
    text = (f"At batch size {b.bs} the slope of {name} {verb} from {fmt(b.slope_before)} to "
            f"{fmt(b.slope_after)} per added sequence ({fmt(b.change_per_seq, True)} per sequence"
            f"{stat}, noise from {b.noise}): {verdict}")
    if b.significant and b.cause and same_as:
        text += f"; cause {b.cause}, as for {same_as}"
    elif b.significant and b.cause:
        text += f"; cause {b.cause}: {b.reason}"
    elif b.significant and b.reason:
        text += f"; {b.reason}"
    return text + "."


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
    model = f"a {_params_words(params)} model in {_dtype_words(dtype_bytes)}"
    head = f"{_params_number(params)} parameters x {dtype_bytes:g} bytes = {u.main(weights)} of weights"
    if weights > y.max():
        return [f"{head}, more than every reading (max {u.main(y.max())}): the readings cannot "
                f"include the weights of {model} on one device \u2014 quantised, sharded across "
                f"devices, or not the same measurement."]
    if weights > y.min():
        below = [int(b) for b, v in zip(series.x, y) if v < weights]
        return [f"{head}, more than the readings at batch sizes {_list(below, str)}: those "
                f"readings cannot include the weights of {model} on one device."]
    return []


def _params_number(params: float) -> str:
    """40e9 rather than 4e+10: the way model sizes are written."""
    for exp in (12, 9, 6):
        if params >= 10.0**exp:
            return f"{params / 10.0**exp:g}e{exp}"
    return f"{params:g}"


def _params_words(params: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if params >= size:
            return f"{params / size:g}{suffix}"
    return f"{params:g}-parameter"


def _dtype_words(dtype_bytes: float) -> str:
    return {0.5: "4-bit", 1.0: "8-bit", 2.0: "16-bit (FP16/BF16)", 4.0: "FP32"}.get(
        dtype_bytes, f"{dtype_bytes:g} bytes per parameter")


def _causes(results, findings) -> list[str]:
    found = {b.cause for r in results for b in r.breakpoints if b.significant and b.cause}
    found |= {f.cause for f in findings}
    return [c for c in CAUSES if c in found]


# ------------------------------------------------------------------------ kvprof sweep
class Evidence:
    """Per-run facts by batch size (mean over points that share a batch size)."""

    def __init__(self, points: list[SweepPoint]):
        grouped: dict[int, list[dict]] = {}
        for p in points:
            grouped.setdefault(int(p.batch_size), []).append(p.evidence or {})
        self.by_bs = {bs: _merge(evs) for bs, evs in grouped.items()}

    def values(self, key: str, bss) -> list[tuple[int, float]]:
        """(batch size, value) for the given batch sizes where the fact is known."""
        out = []
        for bs in bss:
            v = self.by_bs.get(int(bs), {}).get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append((int(bs), float(v)))
        return out

    def mean(self, key: str, bss) -> float | None:
        vals = [v for _, v in self.values(key, bss)]
        return float(np.mean(vals)) if vals else None

    def first(self, key: str):
        for bs in sorted(self.by_bs):
            v = self.by_bs[bs].get(key)
            if v is not None:
                return v
        return None


def _merge(evs: list[dict]) -> dict:
    out = {}
    for key in {k for e in evs for k in e}:
        vals = [e[key] for e in evs if e.get(key) is not None]
        numbers = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = float(np.mean(numbers)) if numbers and len(numbers) == len(vals) else (
            vals[0] if vals else None)
    return out


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


def attribute(b: Breakpoint, r: SeriesResult, results: dict, ev: Evidence, u: Units) -> None:
    """Fill b.cause / b.reason from the component's kind and the per-run facts."""
    name = r.series.name
    if name in AGGREGATES:
        _attribute_aggregate(b, results, ev, u)
    elif name in KV_COMPONENTS:
        b.cause, b.reason = _kv_cause(b, r.series.x, ev, u)
    elif name == "activation_workspace":
        b.cause, b.reason = _activation_cause(b, r.series.x, ev)
    elif name == "allocator_reserve" and b.change_per_seq > 0:
        b.cause, b.reason = "allocator_reserve_growth", (
            f"torch's allocator keeps {u.auto(b.change_per_seq)} more per added sequence "
            f"in reserve (reserved - allocated) beyond batch size {b.bs}")


def _sides(x: np.ndarray, bs: int):
    return x[x <= bs], x[x > bs], x[x >= bs]


def _kv_cause(b: Breakpoint, x: np.ndarray, ev: Evidence, u: Units) -> tuple[str | None, str]:
    """Pool full, prefix sharing, batch not filled, then what the sequences held."""
    before, after, from_knot = _sides(x, b.bs)
    if b.change_per_seq < 0:
        facts = _capacity_facts(from_knot, ev)
        if facts:
            return "kv_capacity_limit", "KV blocks in use reached the usable pool (" + "; ".join(facts) + ")"
    shared = _sharing_fact(b.bs, before, after, ev)
    if shared:
        return "prefix_sharing", shared
    if b.change_per_seq < 0:
        filled = _unfilled_facts(from_knot, ev)
        if filled:
            return "batch_not_filled", "; ".join(filled)
    bps_b, bps_a = ev.mean("mean_blocks_per_seq", before), ev.mean("mean_blocks_per_seq", after)
    tok_b, tok_a = ev.mean("mean_context_tokens", before), ev.mean("mean_context_tokens", after)
    if not (bps_b and bps_a and tok_b and tok_a):
        return None, "no per-run fact explains it"
    r_blocks, r_tokens = bps_a / bps_b, tok_a / tok_b
    held = (f"mean tokens held per sequence {_count(tok_b)} \u2192 {_count(tok_a)} "
            f"(x{r_tokens:.2f}), blocks per sequence {bps_b:.2f} \u2192 {bps_a:.2f} (x{r_blocks:.2f})")
    if abs(math.log(r_blocks / r_tokens)) > math.log(1 + MIN_RELATIVE_CHANGE):
        size = ev.first("block_size")
        return "block_rounding", (f"{held}: each sequence pays whole blocks"
                                  + (f" of {_count(size)} tokens" if size else "")
                                  + ", so the blocks moved far more than the tokens")
    if abs(math.log(r_tokens)) >= math.log(1 + MIN_TOKEN_CHANGE):
        return "kv_context_growth", (f"{held}: KV memory follows the tokens held, linear in "
                                     f"tokens, not quadratic")
    return None, f"{held}: neither moved enough to explain it"


def _sharing_fact(bs: int, before, after, ev: Evidence) -> str:
    """Sequences sharing prefix blocks more on one side of the knot than on the other."""
    sh_b, sh_a = ev.mean("kv_sharing", before), ev.mean("kv_sharing", after)
    if sh_b is None or sh_a is None or abs(sh_a - sh_b) < MIN_SHARING_CHANGE:
        return ""
    bps_b, bps_a = ev.mean("mean_blocks_per_seq", before), ev.mean("mean_blocks_per_seq", after)
    return (f"sequences share prefix blocks (prefix caching): {100 * sh_a:.0f} % of the blocks "
            f"they would need alone are shared above batch size {bs}, {100 * sh_b:.0f} % up to it"
            + (f"; blocks in use per sequence {bps_b:.2f} \u2192 {bps_a:.2f}" if bps_b and bps_a else ""))


def _capacity_facts(bss, ev: Evidence) -> list[str]:
    """Facts that the KV pool was full at these batch sizes (empty: it was not)."""
    usable = dict(ev.values("kv_blocks_usable", bss))
    full = [(bs, v) for bs, v in ev.values("kv_peak_blocks", bss)
            if usable.get(bs, 0) > 0 and v >= 0.9 * usable[bs]]
    preempted = [(bs, v) for bs, v in ev.values("preemptions", bss) if v > 0]
    if not (full or preempted):
        return []
    facts = []
    if full:
        share = min(v / usable[bs] for bs, v in full)
        facts.append(_at(full, "peak blocks in use") + f", at least {100 * share:.0f} % of the "
                     f"usable pool ({_count(usable[full[0][0]])} blocks)")
    if preempted:
        facts.append(_at(preempted, "preemptions"))
    short = [(bs, v) for bs, v in ev.values("peak_running", bss) if v < bs]
    if short:
        facts.append("at most " + _at(short, "sequences ran") + ", below max_num_seqs")
    waiting = [(bs, v) for bs, v in ev.values("waiting_peak", bss) if v > 0]
    if waiting and (short or preempted):
        facts.append("up to " + _at(waiting, "requests waited"))
    return facts


def _at(pairs, noun: str) -> str:
    """'48, 144 preemptions at batch sizes 32, 64'."""
    distinct = {_count(v) for _, v in pairs}
    values = distinct.pop() if len(distinct) == 1 else ", ".join(_count(v) for _, v in pairs)
    sizes = ", ".join(str(bs) for bs, _ in pairs)
    if values == "1":   # '1 preemption', '1 request waited'
        first, _, rest = noun.partition(" ")
        noun = " ".join(filter(None, [first.removesuffix("s"), rest]))
    return f"{values} {noun} at batch size{'s' if len(pairs) > 1 else ''} {sizes}"


def _unfilled_facts(bss, ev: Evidence) -> list[str]:
    short = [(bs, v) for bs, v in ev.values("peak_running", bss) if v < 0.9 * bs]
    return [f"at most {_at(short, 'sequences ran')} with the KV pool not full: too few "
            f"requests to fill the batch"] if short else []


def _activation_cause(b: Breakpoint, x: np.ndarray, ev: Evidence) -> tuple[str | None, str]:
    before, after, _ = _sides(x, b.bs)
    sat_b = ev.mean("budget_saturated_share", before) or 0.0
    sat_a = ev.mean("budget_saturated_share", after)
    budget = ev.first("token_budget")
    if b.change_per_seq < 0 and sat_a is not None and sat_a >= 0.5 and sat_a - sat_b >= 0.25:
        return "token_budget_saturated", (
            f"{100 * sat_a:.0f} % of steps scheduled the whole token budget"
            + (f" of {_count(budget)} tokens" if budget else "")
            + f" above batch size {b.bs} ({100 * sat_b:.0f} % up to it): the forward stops "
              f"growing with the batch")
    padded = _padding_facts(x, b.bs, ev)
    if padded:
        return "cudagraph_padding", ("the batch is padded up to the next CUDA-graph capture "
                                     "size, so activation memory moves in steps: " + "; ".join(padded))
    if sat_a is not None and sat_a >= 0.5:
        return "token_budget_saturated", (f"{100 * sat_a:.0f} % of steps scheduled the whole "
                                          f"token budget above batch size {b.bs}")
    return None, "no per-run fact explains it"


def _padding_facts(x: np.ndarray, bs: int, ev: Evidence) -> list[str]:
    """Batch sizes near the knot whose forward ran padded to a larger capture size."""
    sizes = sorted({int(s) for v in ev.by_bs.values()
                    for s in (v.get("cudagraph_capture_sizes") or [])})
    if not sizes:
        return []
    k = int(np.flatnonzero(x == bs)[0]) if np.any(x == bs) else 0
    near = x[max(k - 1, 0):k + 2]
    running = dict(ev.values("peak_running", near))
    facts = []
    for b in near:
        n = int(running.get(int(b), b))
        pad = next((s for s in sizes if s >= n), None)
        if pad is not None and pad != n:
            facts.append(f"{n} sequences ran padded to {pad} at batch size {int(b)}")
    return facts


def _attribute_aggregate(b: Breakpoint, results: dict, ev: Evidence, u: Units) -> None:
    """The contributing component whose slope changed most like the aggregate's, and its cause."""
    best = None
    for name in CONTRIBUTORS:
        r = results.get(name)
        if r is None or r.fit is None:
            continue
        change = _local_change(r, b.bs)
        if change is None or change * b.change_per_seq <= 0:
            continue
        score = abs(change - b.change_per_seq)
        if best is None or score < best[0]:
            best = (score, name, change, r)
    if best is None:
        b.reason = "no measured component changed slope the same way here"
        return
    _, name, change, r = best
    own = [c for c in r.breakpoints if c.significant and abs(_index(r, c.bs) - _index(r, b.bs)) <= 1
           and c.change_per_seq * change > 0]
    cause = own[0].cause if own else None
    reason = own[0].reason if own else ""
    if cause is None and name != "non_torch":
        probe = Breakpoint(b.bs, 0.0, change, change, 1.0, True, None, None, 0, "", name)
        attribute(probe, r, results, ev, u)
        cause, reason = probe.cause, probe.reason
    b.component, b.cause = name, cause
    b.reason = f"{name} changed slope by {u.auto(change, True)} per sequence there"
    if own:
        b.reason += f" (see {name} below)"
    elif reason:
        b.reason += f" ({reason})"


def _index(r: SeriesResult, bs: int) -> int:
    hits = np.flatnonzero(r.series.x == bs)
    return int(hits[0]) if hits.size else -99


def _local_change(r: SeriesResult, bs: int) -> float | None:
    """A component's slope change around ``bs``: after - before, from its fitted pieces over
    the neighbouring batch sizes (so a knot one step away still counts)."""
    x = r.series.x
    k = _index(r, bs)
    if k < 1 or k > x.size - 2:
        return None
    fitted = design_matrix(x, r.fit.knots) @ r.fit.coef
    lo, hi = max(k - 2, 0), min(k + 2, x.size - 1)
    before = (fitted[k] - fitted[lo]) / (x[k] - x[lo])
    after = (fitted[hi] - fitted[k]) / (x[hi] - x[k])
    return float(after - before)


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
    full = [int(bs) for bs in kv.series.x if _capacity_facts([bs], ev)]
    if not full:
        return []
    facts = "; ".join(_capacity_facts(full, ev))
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
            + (f" ({_count(tokens)} tokens, {u.auto(bpb / size)} per token)" if tokens and size else "")
            + f" = {u.auto(per_seq)} per sequence. Under PagedAttention KV memory is linear in "
              f"the tokens held, not quadratic.")
    out = [Finding("kv_context_growth", kv.series.name, text)]
    if tokens and size and bps * size > ROUNDING_SLACK * tokens:
        slots = bps * size
        out.append(Finding("block_rounding", kv.series.name, (
            f"Each sequence pays whole blocks: {_count(tokens)} tokens held on average take "
            f"{bps:.2f} blocks x {_count(size)} = {_count(slots)} token slots "
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
