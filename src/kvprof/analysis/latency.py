"""Latency of finished requests: TTFT, TPOT, ITL, end-to-end and queue time, in ms.

Pure NumPy: per-request columns of the ``requests`` table in, summaries out
(the facade turns the per-request columns into an Arrow table).
Percentiles follow ``numpy.percentile`` (linear interpolation) so that any
NumPy or pandas reference gives the same numbers; ITL uses the same rule on
values with counts, because most inter-token gaps repeat per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

import numpy as np

from kvprof.analysis.quantiles import (interpolate, neighbour_ranks, positive_counts,
                                       ranked_percentile)

QUANTILES = (50, 90, 99)
NS_PER_MS = 1e6
KINDS = ("ttft", "tpot", "itl", "e2e", "queue")


@dataclass
class Summary:
    """Mean and percentiles of one latency, in ms; None when nothing was measured."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    def to_dict(self) -> dict:
        return {"mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99,
                "count": self.count}


@dataclass
class Latency:
    """The five latencies over the requests that finished in the selection."""

    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    queue: Summary
    # the finished requests' columns (``per_request_ms`` is made from them when first asked)
    requests: Mapping[str, np.ndarray] = field(repr=False, default_factory=dict)
    itl_values_ns: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.int64))
    itl_counts: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.int64))

    @cached_property
    def per_request_ms(self) -> dict[str, np.ndarray]:
        """Each latency per request in ms (NaN: undefined) and "req". Made when asked (HTML,
        export, comparisons): a JSON or text report never holds 36 bytes a request for it."""
        return per_request_ms(self.requests)

    def kind_ms(self, kind: str) -> np.ndarray:
        """One of REQUEST_KINDS per request, without making the others."""
        made = self.__dict__.get("per_request_ms")
        return made[kind] if made is not None else request_ms(self.requests, kind)

    @property
    def itl_values_ms(self) -> np.ndarray:
        """Made when asked (plots, comparisons): a long trace's gaps are kept once, in ns."""
        return ms(self.itl_values_ns)

    def to_dict(self) -> dict:
        return {kind: getattr(self, kind).to_dict() for kind in KINDS}


def summarize(values: np.ndarray) -> Summary:
    """Mean, p50, p90, p99 of plain values (``numpy.percentile``, linear)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Summary(0)
    p50, p90, p99 = (float(v) for v in np.percentile(values, QUANTILES))
    return Summary(int(values.size), float(values.mean()), p50, p90, p99)


def weighted_summary(values: np.ndarray, counts: np.ndarray) -> Summary:
    """Like ``summarize(np.repeat(values, counts))`` without materialising the repeat."""
    values, counts = positive_counts(np.asarray(values, np.float64), np.asarray(counts))
    n = int(counts.sum(dtype=np.int64))
    if n == 0:
        return Summary(0)
    mean = float(np.dot(values, counts.astype(np.float64, copy=False)) / n)
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(counts[order], dtype=np.int64)
    values = values[order]
    del order                                  # one step's worth of temporaries at a time
    return Summary(n, mean, *(ranked_percentile(values, cum, n, q) for q in QUANTILES))


def weighted_summary_ns(values_ns: np.ndarray, counts: np.ndarray, chunk: int = 1 << 20) -> Summary:
    """``weighted_summary(ms(values_ns), counts)`` from integer ns, for a long trace's ITL
    gaps: one packed array (value << bits | count) sorted in place, walked chunk by
    chunk, instead of an argsort and three gathers (5 copies of 16 M gaps at 1 B rows).
    The mean is exact (integer sums). Values that do not pack take the general path."""
    values_ns, counts = positive_counts(np.asarray(values_ns), np.asarray(counts))
    n = int(counts.sum(dtype=np.int64))
    if n == 0:
        return Summary(0)
    value_bits, count_bits = int(values_ns.max()).bit_length(), int(counts.max()).bit_length()
    if values_ns.dtype.kind not in "iu" or values_ns.min() < 0 or value_bits + count_bits > 62:
        return weighted_summary(ms(values_ns), counts)
    packed = values_ns.astype(np.int64) << count_bits
    packed |= counts
    packed.sort()
    mask = (1 << count_bits) - 1
    step = max(1, min(chunk, 1 << max(0, 62 - value_bits - count_bits)))   # no int64 overflow
    total, seen, wanted = 0, 0, _ranks_wanted(n)
    found: dict[int, float] = {}
    for lo in range(0, packed.size, step):
        piece = packed[lo:lo + step]
        c = piece & mask
        total += int(np.dot(piece >> count_bits, c))
        cum = np.cumsum(c) + seen
        for rank in [r for r in wanted if r not in found and r < cum[-1]]:
            found[rank] = float(piece[np.searchsorted(cum, rank, side="right")] >> count_bits) / NS_PER_MS
        seen = int(cum[-1])
    return Summary(n, total / n / NS_PER_MS,
                   *(_interpolated(found, n, q) for q in QUANTILES))


def _ranks_wanted(n: int) -> set[int]:
    """The order statistics every quantile reads."""
    return {k for q in QUANTILES for k in neighbour_ranks(n, q)[:2]}


def _interpolated(value_at: dict[int, float], n: int, q: float) -> float:
    lo, hi, t = neighbour_ranks(n, q)
    return interpolate(value_at[lo], value_at[hi], t)


REQUEST_KINDS = ("ttft", "e2e", "queue", "tpot")   # one value per request (ITL: per token)


def per_request_ms(req: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each latency per request in ms, NaN where undefined (definitions in docs/analyses.md),
    with the request index under "req"."""
    return {"req": np.asarray(req["req"]), **{kind: request_ms(req, kind) for kind in REQUEST_KINDS}}


def request_ms(req: Mapping[str, np.ndarray], kind: str) -> np.ndarray:
    """One of REQUEST_KINDS per request, in ms (NaN: undefined)."""
    if kind == "tpot":
        outputs = np.asarray(req["output_tokens"])
        span = _span_ms(req["first_token_ns"], req["finish_ns"])
        return np.where(outputs >= 2, span / np.maximum(outputs - 1, 1), np.nan)
    start, end = {"ttft": ("arrival_ns", "first_token_ns"), "e2e": ("arrival_ns", "finish_ns"),
                  "queue": ("queued_ns", "first_scheduled_ns")}[kind]
    return _span_ms(req[start], req[end])


def _span_ms(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(end - start) in ms where both times are known (>= 0), else NaN."""
    known = (start >= 0) & (end >= 0)
    return np.where(known, (end - start) / NS_PER_MS, np.nan)


def ms(values_ns: np.ndarray) -> np.ndarray:
    return np.asarray(values_ns, np.float64) / NS_PER_MS


def latency(req: Mapping[str, np.ndarray], itl_values_ns: np.ndarray,
            itl_counts: np.ndarray) -> Latency:
    """Summaries over the given (already chosen) finished requests and their ITL gaps,
    one latency at a time (a day's requests: one column of temporaries at once)."""
    summaries = {kind: _defined_summary(request_ms(req, kind)) for kind in REQUEST_KINDS}
    return Latency(itl=weighted_summary_ns(itl_values_ns, itl_counts), requests=req,
                   itl_values_ns=np.asarray(itl_values_ns), itl_counts=np.asarray(itl_counts),
                   **summaries)


def summarised(per_request: dict[str, np.ndarray], itl_values_ns: np.ndarray,
               itl_counts: np.ndarray) -> Latency:
    """Summaries of per-request latencies (NaN: undefined) and of ITL values (ns) with counts."""
    summaries = {kind: _defined_summary(v) for kind, v in per_request.items() if kind != "req"}
    result = Latency(itl=weighted_summary_ns(itl_values_ns, itl_counts),
                     itl_values_ns=np.asarray(itl_values_ns), itl_counts=np.asarray(itl_counts),
                     **summaries)
    result.per_request_ms = per_request      # given, not made from request columns
    return result


def _defined_summary(values: np.ndarray) -> Summary:
    return summarize(values[~np.isnan(values)])
