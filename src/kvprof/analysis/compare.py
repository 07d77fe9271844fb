"""Compare runs: the same measures side by side, each difference with its size and
whether it is more than run-to-run noise, what differs in the engine configuration,
and whether the workloads differ enough to mislead.

Pure: traces in (one per round of each run), a ``Comparison`` out. Each trace goes
through ``analyze``; the measures are recomputed here from per-request and per-step
units only so that they can be resampled (``compare_noise``). The first run is the
baseline every change is measured against. Definitions: docs/analyses.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvprof.analysis import Analysis, analyze, numpy_column
from kvprof.analysis.compare_noise import (RESAMPLES, Noise, bootstrap_test, itl_replicates,
                                           replicates, rounds_test)
from kvprof.analysis.latency import KINDS
from kvprof.analysis.sweep import COMPONENTS, device_and_capacity, memory_components
from kvprof.errors import UsageError

NS_PER_S = 1e9
STATS = ("mean", "p50", "p90", "p99")
_PERCENT = {"p50": 50, "p90": 90, "p99": 99}
# Workload warnings: a request count, a mean length, or a length distribution (two-sample
# Kolmogorov-Smirnov distance) that differs by more than this from the baseline's.
WORKLOAD_TOLERANCE = 0.05
CONFIG_SECTIONS = ("engine", "model", "kv", "hardware")
CONFIG_SKIP = {"kv.groups", "hardware.platform"}


@dataclass
class RunInput:
    """One run to compare: a label, what the user named, and its traces (one per round)."""

    label: str
    source: str
    traces: list


@dataclass
class MetricSpec:
    """How one measure is computed from a round's units (``kind``: which units)."""

    name: str
    group: str
    unit: str
    kind: str                      # "requests", "admitted", "steps", "itl" or "fixed"
    statistic: Callable            # columns -> value (last axis reduced); "fixed": (Round) -> value
    columns: tuple[str, ...] = ()  # units with a NaN in one of these are left out


@dataclass
class Round:
    """One trace of a run: its analysis and the units the measures are computed from."""

    trace: object
    analysis: Analysis
    units: dict[str, dict[str, np.ndarray]]
    itl: tuple[np.ndarray, np.ndarray]
    itl_replicates: dict = field(default_factory=dict)   # by run index: every ITL summary resampled


@dataclass
class Metric:
    name: str
    group: str
    unit: str
    values: list[float | None]                 # per run (mean over its rounds)
    change: list[dict | None]                  # per run against the baseline; None for it
    significant: list[bool | None]
    interval: list[list[float] | None]         # of the difference (bootstrap) or ±noise (rounds)
    rounds: list[list[float | None]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Comparison:
    runs: list[dict]
    metrics: list[Metric]
    config_differences: list[dict]
    warnings: list[str]
    noise: Noise

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)

    def to_dict(self) -> dict:
        """The JSON report of ``kvprof compare --json`` (docs/analyses.md)."""
        return {"report_version": "1.0", "baseline": self.runs[0]["label"], "runs": self.runs,
                "noise": self.noise.to_dict(), "metrics": [m.to_dict() for m in self.metrics],
                "config_differences": self.config_differences, "warnings": list(self.warnings)}


def _mean(col):
    return lambda u: np.mean(u[col], axis=-1)


def _percentile(col, q):
    return lambda u: np.percentile(u[col], q, axis=-1)


def _ratio(num, den):
    return lambda u: np.sum(u[num], axis=-1) / np.sum(u[den], axis=-1)


def _total(col):
    return lambda u: np.sum(u[col], axis=-1)


def metric_specs(coefficients: list[str]) -> list[MetricSpec]:
    """The measures compared, in report order; ``coefficients``: the step-time model's terms."""
    specs = [MetricSpec(f"{name}_per_s", "throughput", f"{unit}/s", "steps", _ratio(name, "span_s"))
             for name, unit in (("output_tokens", "tokens"), ("input_tokens", "tokens"),
                                ("requests", "requests"))]
    for kind in KINDS:
        for stat in STATS:
            name = f"{kind}_{stat}_ms"
            if kind == "itl":
                specs.append(MetricSpec(name, "latency", "ms", "itl", stat))
            else:
                make = _mean(kind) if stat == "mean" else _percentile(kind, _PERCENT[stat])
                specs.append(MetricSpec(name, "latency", "ms", "requests", make, (kind,)))
    specs += [
        MetricSpec("mean_running", "batch", "sequences", "steps", _mean("running")),
        MetricSpec("max_running", "batch", "sequences", "fixed", lambda r: r.analysis.batch.max_running),
        MetricSpec("mean_waiting", "batch", "requests", "steps", _mean("waiting")),
        MetricSpec("mean_decode_requests", "batch", "requests", "steps", _mean("decode")),
        MetricSpec("prefill_token_share", "batch", "fraction", "steps", _ratio("prefill", "scheduled")),
        MetricSpec("mean_kv_blocks_used", "kv", "blocks", "steps", _mean("kv_blocks")),
        MetricSpec("peak_kv_blocks_used", "kv", "blocks", "fixed", lambda r: r.analysis.kv.peak_blocks_used),
        MetricSpec("prefix_hit_rate", "kv", "fraction", "admitted", _ratio("cached", "prompt")),
        MetricSpec("preemptions", "kv", "preemptions", "steps", _total("preemptions")),
        MetricSpec("preempted_tokens", "kv", "tokens", "steps", _total("preempted_tokens")),
    ]
    specs += [MetricSpec(f"step_model_{term}", "step_time_model", "ns", "fixed", _coefficient(term))
              for term in coefficients]
    specs += [MetricSpec(f"memory_{name}_bytes", "memory", "bytes", "fixed", _component(name))
              for name in COMPONENTS]
    return specs


def _coefficient(term: str):
    """A term of the step-time model, read from its JSON report (its public result)."""
    return lambda r: (r.analysis.to_dict()["step_time_model"].get("coefficients") or {}).get(term)


def _component(name: str):
    return lambda r: memory_components(r.trace, r.analysis, device_and_capacity(r.trace.run)[0])[name]


def compare(runs: list[RunInput], seed: int = 0, resamples: int = RESAMPLES) -> Comparison:
    """Compare ``runs`` against the first; at least two runs, each with one trace or more."""
    if len(runs) < 2:
        raise UsageError("compare needs at least two runs")
    rounds = [[make_round(t) for t in run.traces] for run in runs]
    noise = Noise("rounds" if all(len(r) >= 2 for r in rounds) else "bootstrap", resamples,
                  seed=seed)
    metrics = [_metric(spec, i, rounds, noise) for i, spec in enumerate(metric_specs(_terms(rounds)))]
    traces = [[r.trace for r in rs] for rs in rounds]
    return Comparison(runs=[_run_dict(run, rs) for run, rs in zip(runs, rounds)],
                      metrics=metrics, config_differences=config_differences(traces),
                      warnings=_warnings(runs, rounds), noise=noise)


def _terms(rounds: list[list[Round]]) -> list[str]:
    terms: list[str] = []
    for rs in rounds:
        for r in rs:
            coefficients = r.analysis.to_dict()["step_time_model"].get("coefficients") or {}
            terms += [t for t in coefficients if t not in terms]
    return terms


def make_round(trace) -> Round:
    """Analyse one trace and gather its units: finished requests, admitted requests, steps."""
    analysis = analyze(trace)
    per_req = analysis.latency.per_request_ms
    req = {name: numpy_column(trace["requests"].column(name)) for name in
           ("first_scheduled_step", "prompt_tokens", "cached_prompt_tokens", "finish_ns")}
    admitted = req["first_scheduled_step"] >= 0
    units = {"requests": {kind: per_req[kind] for kind in KINDS if kind != "itl"},
             "admitted": {"prompt": req["prompt_tokens"][admitted].astype(np.float64),
                          "cached": req["cached_prompt_tokens"][admitted].astype(np.float64)},
             "steps": step_units(trace, analysis, req["first_scheduled_step"][admitted],
                                 req["prompt_tokens"][admitted])}
    return Round(trace, analysis, units,
                 (analysis.latency.itl_values_ms, analysis.latency.itl_counts))


def step_units(trace, analysis: Analysis, admit_step: np.ndarray, prompt: np.ndarray) -> dict:
    """Per step: its time span (schedule start to the next step's), what it produced and held.
    Summed spans are the trace's duration, so rates resample as ratios of sums."""
    steps = {name: numpy_column(trace["steps"].column(name)) for name in
             ("step", "t_schedule_start_ns", "t_update_end_ns", "finished", "preemptions",
              "preempted_tokens")}
    start = steps["t_schedule_start_ns"]
    span = np.append(np.diff(start), steps["t_update_end_ns"][-1] - start[-1]) / NS_PER_S
    position = np.minimum(np.searchsorted(steps["step"], admit_step), start.size - 1)
    tl = {name: numpy_column(analysis.timeline.column(name)) for name in
          ("output_tokens", "running", "waiting", "decode_requests", "prefill_tokens",
           "total_tokens", "kv_blocks_used")}
    f64 = np.float64
    return {"span_s": span, "output_tokens": tl["output_tokens"].astype(f64),
            "input_tokens": np.bincount(position, weights=prompt.astype(f64), minlength=span.size),
            "requests": steps["finished"].astype(f64), "running": tl["running"].astype(f64),
            "waiting": tl["waiting"].astype(f64), "decode": tl["decode_requests"].astype(f64),
            "prefill": tl["prefill_tokens"].astype(f64), "scheduled": tl["total_tokens"].astype(f64),
            "kv_blocks": tl["kv_blocks_used"].astype(f64),
            "preemptions": steps["preemptions"].astype(f64),
            "preempted_tokens": steps["preempted_tokens"].astype(f64)}


def _units(spec: MetricSpec, rd: Round) -> dict[str, np.ndarray]:
    units = rd.units[spec.kind]
    keep = np.ones(len(next(iter(units.values()))), bool)
    for col in spec.columns:
        keep &= ~np.isnan(units[col])
    return {name: col[keep] for name, col in units.items()} if not keep.all() else units


def _value(spec: MetricSpec, rd: Round) -> float | None:
    """The measure on one round's units (None when it has none)."""
    if spec.kind == "fixed":
        value = spec.statistic(rd)
    elif spec.kind == "itl":
        value = getattr(rd.analysis.latency.itl, spec.statistic)
    else:
        units = _units(spec, rd)
        value = spec.statistic(units) if len(next(iter(units.values()))) else None
    return None if value is None or not np.isfinite(value) else float(value)


def _replicates(spec: MetricSpec, run_index: int, rds: list[Round], noise: Noise,
                metric_index: int) -> np.ndarray:
    """Resampled values of a run: the mean over its rounds, each round resampled on its own."""
    rng = np.random.default_rng([noise.seed, metric_index, run_index])
    per_round = []
    for round_index, rd in enumerate(rds):
        if spec.kind == "itl":   # the four ITL summaries come from one set of resamples
            if run_index not in rd.itl_replicates:
                itl_rng = np.random.default_rng([noise.seed, run_index, round_index])
                rd.itl_replicates[run_index] = itl_replicates(*rd.itl, STATS, noise.resamples,
                                                              itl_rng)
            per_round.append(rd.itl_replicates[run_index][spec.statistic])
        else:
            per_round.append(replicates(_units(spec, rd), spec.statistic, noise.resamples, rng))
    return np.mean(per_round, axis=0)


def _metric(spec: MetricSpec, index: int, rounds: list[list[Round]], noise: Noise) -> Metric:
    per_round = [[_value(spec, rd) for rd in rds] for rds in rounds]
    values = [_mean_known(v) for v in per_round]
    base = values[0]
    m = Metric(spec.name, spec.group, spec.unit, values, [None], [None], [None], per_round)
    base_reps = None
    for i in range(1, len(rounds)):
        m.change.append(_change(base, values[i]))
        significant, interval = None, None
        if base is not None and values[i] is not None:
            if noise.method == "rounds":
                significant, interval = rounds_test(per_round[0], per_round[i])
            elif spec.kind != "fixed":
                if base_reps is None:
                    base_reps = _replicates(spec, 0, rounds[0], noise, index)
                other = _replicates(spec, i, rounds[i], noise, index)
                significant, interval = bootstrap_test(base_reps, other, noise.confidence)
        m.significant.append(significant)
        m.interval.append(interval)
    return m


def _mean_known(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _change(base: float | None, value: float | None) -> dict | None:
    if base is None or value is None:
        return None
    return {"absolute": value - base, "relative": (value - base) / abs(base) if base else None}


def _run_dict(run: RunInput, rds: list[Round]) -> dict:
    run_meta = rds[0].trace.run
    return {"label": run.label, "source": run.source, "traces": [r.trace.path for r in rds],
            "rounds": len(rds), "vllm_version": run_meta.get("vllm_version"),
            "configuration": flat_config(run_meta),
            "requests": [r.analysis.requests for r in rds],
            "warnings": [w for r in rds for w in r.analysis.warnings]}


def flat_config(run: dict) -> dict:
    """The engine configuration and what it ran on, as dotted keys (lists kept whole)."""
    out = {"vllm_version": run.get("vllm_version"), "kvprof_version": run.get("kvprof_version")}
    for section in CONFIG_SECTIONS:
        for key, value in (run.get(section) or {}).items():
            name = f"{section}.{key}"
            if name not in CONFIG_SKIP and not isinstance(value, dict):
                out[name] = value
    workers = run.get("workers") or []
    out["workers"] = len(workers)
    out["device"] = device_and_capacity(run)[0]
    out["torch"] = sorted({w.get("torch") for w in workers if w.get("torch")}) or None
    return out


def config_differences(traces: list[list]) -> list[dict]:
    """Every configuration key whose value is not the same in all runs (and all rounds)."""
    configs = [[flat_config(t.run) for t in ts] for ts in traces]
    keys = sorted({k for cs in configs for c in cs for k in c})
    out = []
    for key in keys:
        values = [[c.get(key) for c in cs] for cs in configs]
        firsts = [v[0] for v in values]
        if any(v != firsts[0] for v in firsts) or any(len({repr(x) for x in v}) > 1 for v in values):
            out.append({"key": key, "values": firsts})
    return out


def _warnings(runs: list[RunInput], rounds: list[list[Round]]) -> list[str]:
    """When the workloads differ, a difference of latency or throughput may be the workload's."""
    out = []
    base = workload(rounds[0])
    for run, rds in zip(runs[1:], rounds[1:]):
        out += [f"{run.label} vs {runs[0].label}: {w}" for w in workload_differences(base, workload(rds))]
    for run, rds in zip(runs, rounds):
        out += [f"{run.label}: {w}" for r in rds for w in r.analysis.warnings]
    return out


def workload(rds: list[Round]) -> dict[str, np.ndarray]:
    """Prompt and output lengths of every request of the run's first round, and its count."""
    requests = rds[0].trace["requests"]
    return {"prompt": numpy_column(requests.column("prompt_tokens")).astype(np.float64),
            "output": numpy_column(requests.column("max_tokens")).astype(np.float64)}


def workload_differences(a: dict, b: dict) -> list[str]:
    """What differs between two workloads: request count, prompt and output lengths
    (requested output lengths, so that a run cut short does not look like another workload)."""
    out = []
    if a["prompt"].size != b["prompt"].size:
        out.append(f"the workloads differ: {a['prompt'].size} vs {b['prompt'].size} requests")
    for name, label in (("prompt", "prompt lengths"), ("output", "requested output lengths")):
        x, y = a[name], b[name]
        if not (x.size and y.size):
            continue
        mean_x, mean_y = x.mean(), y.mean()
        relative = abs(mean_y - mean_x) / mean_x if mean_x else float(mean_y != mean_x)
        distance = ks_distance(x, y)
        if relative > WORKLOAD_TOLERANCE or distance > 2 * WORKLOAD_TOLERANCE:
            out.append(f"the workloads differ: {label} mean {mean_x:,.1f} vs {mean_y:,.1f} "
                       f"(distributions {distance:.2f} apart, Kolmogorov-Smirnov); a difference "
                       f"of latency or throughput may be the workload's, not the configuration's")
    return out


def ks_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Largest gap between the two empirical distribution functions."""
    grid = np.union1d(x, y)
    fx = np.searchsorted(np.sort(x), grid, side="right") / x.size
    fy = np.searchsorted(np.sort(y), grid, side="right") / y.size
    return float(np.abs(fx - fy).max())
