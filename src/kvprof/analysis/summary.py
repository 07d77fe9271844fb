"""A trace's results in a form that merges: per day, per replica, without the rows.

``kvprof analyze TRACE --summary OUT`` keeps what adds up across traces: steps, finished
requests, tokens, the traced duration, and each latency as a ``Quantiles`` summary
(exact values while a kind has at most ``EXACT_MAX`` distinct values, logarithmic
buckets within ``RELATIVE_ERROR`` after). ``kvprof merge`` adds summaries together:
counts and sums exactly, percentiles exactly while every part is exact and the
merged one stays under the limit, within the relative error bound otherwise.

Durations add: traces of different days share no clock, so throughput is the tokens
over the summed traced time (the busy time). A data-parallel deployment's summary
is its replicas merged with the deployment's span as its duration (they run at once).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvprof.analysis.latency import KINDS, NS_PER_MS, QUANTILES, Latency, Summary
from kvprof.analysis.quantiles import RELATIVE_ERROR, Quantiles
from kvprof.errors import TraceFormatError

TOKEN_KINDS = ("input", "cached_input", "output", "scheduled")
CHUNK = 1 << 20


@dataclass
class TraceSummary:
    """What ``kvprof merge`` adds up; ``traces``: the trace files it came from."""

    traces: list[str]
    steps: int
    duration_s: float
    requests_finished: int
    tokens: dict[str, int]
    latency_ms: dict[str, Quantiles] = field(repr=False)

    @property
    def exact(self) -> bool:
        return all(q.exact for q in self.latency_ms.values())

    def latency(self) -> Latency:
        """The summaries as the text report draws them (ms)."""
        return Latency(**{kind: _summary(self.latency_ms[kind]) for kind in KINDS})

    def throughput(self) -> dict[str, float | None]:
        d = self.duration_s
        return {"output_tokens_per_s": self.tokens["output"] / d if d else None,
                "total_tokens_per_s": (self.tokens["input"] + self.tokens["output"]) / d if d else None,
                "requests_per_s": self.requests_finished / d if d else None}

    def to_dict(self) -> dict:
        return {"traces": list(self.traces), "steps": self.steps, "duration_s": self.duration_s,
                "requests_finished": self.requests_finished, "tokens": dict(self.tokens),
                "throughput": self.throughput(),
                "latency_ms": {kind: {**_summary(q).to_dict(), "exact": q.exact}
                               for kind, q in self.latency_ms.items()},
                "relative_error_bound": None if self.exact else RELATIVE_ERROR}


def _summary(q: Quantiles) -> Summary:
    if q.count == 0:
        return Summary(0)
    return Summary(q.count, q.mean, *q.percentiles(QUANTILES))


def summary_of(analysis, exact_max: int | None = None) -> TraceSummary:
    """One analysed trace (or window) as a mergeable summary."""
    kwargs = {} if exact_max is None else {"exact_max": exact_max}
    lat = analysis.latency
    latency_ms = {}
    for kind in KINDS:
        q = latency_ms[kind] = Quantiles(**kwargs)
        if kind == "itl":      # a day's gaps (16 M at 1 B rows) a chunk at a time
            for lo in range(0, lat.itl_values_ns.size, CHUNK):
                _add(q, np.asarray(lat.itl_values_ns[lo:lo + CHUNK], np.float64) / NS_PER_MS,
                     lat.itl_counts[lo:lo + CHUNK], kind)
        else:
            values = lat.kind_ms(kind)
            _add(q, values[~np.isnan(values)], None, kind)
    t = analysis.tokens
    return TraceSummary([analysis.path], analysis.steps, analysis.duration_s,
                        analysis.requests_finished,
                        {kind: int(getattr(t, kind)) for kind in TOKEN_KINDS}, latency_ms)


def _add(q: Quantiles, values: np.ndarray, counts, kind: str) -> None:
    try:
        q.add(values, counts)
    except ValueError:
        raise TraceFormatError(f"negative {kind} latency in the trace (corrupt trace?)") from None


def merged(parts: list[TraceSummary], duration_s: float | None = None) -> TraceSummary:
    """The summaries added together; ``duration_s``: the wall time when the parts ran at
    once (replicas), else the parts' durations add up."""
    if not parts:
        raise ValueError("nothing to merge")
    latency_ms = {kind: Quantiles(parts[0].latency_ms[kind].exact_max) for kind in KINDS}
    for part in parts:
        for kind in KINDS:
            latency_ms[kind].merge(part.latency_ms[kind])
    return TraceSummary(
        [t for p in parts for t in p.traces], sum(p.steps for p in parts),
        sum(p.duration_s for p in parts) if duration_s is None else duration_s,
        sum(p.requests_finished for p in parts),
        {kind: sum(p.tokens[kind] for p in parts) for kind in TOKEN_KINDS}, latency_ms)
