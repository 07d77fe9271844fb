"""Percentiles of a stream too long to hold: exact while it fits, bounded error after.

``Quantiles`` keeps every value until it has ``exact_max`` of them, so every trace
of ordinary length gets ``numpy.percentile``'s exact answer (linear interpolation).
Past that it folds the values into logarithmic buckets (the DDSketch layout: bucket
``i`` holds (gamma^(i-1), gamma^i], gamma = (1 + a) / (1 - a)) and answers each
order statistic with its bucket's midpoint, within a relative error ``a`` =
``RELATIVE_ERROR`` of the true value; interpolating between two such answers keeps
that bound. Counts, sums, minimum and maximum stay exact. Two summaries merge by
adding their buckets (or values), so per-range or per-trace summaries combine
without their rows. Values may come with counts (a value seen ``c`` times: the
inter-token gaps of one step); ``exact_max`` then counts distinct entries. Values
must be non-negative (durations, sizes); values below ``SMALLEST`` count as zero.
``state()`` and ``from_state`` carry a summary to a file and back (summary files).
"""
from __future__ import annotations

import math

import numpy as np

RELATIVE_ERROR = 0.005
EXACT_MAX = 1 << 21          # values kept exactly (16 MiB of float64)
SMALLEST = 1e-9              # smaller positive values fall in the zero bucket
LARGEST = 1e18               # larger values fall in the last bucket
_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)
_OFFSET = math.ceil(math.log(SMALLEST) / _LOG_GAMMA)
_BUCKETS = math.ceil(math.log(LARGEST) / _LOG_GAMMA) - _OFFSET + 2   # index 0: zero


class Quantiles:
    """A mergeable summary of non-negative values: count, sum, min, max and percentiles."""

    def __init__(self, exact_max: int = EXACT_MAX):
        self.exact_max = exact_max
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._values: list[np.ndarray] = []
        self._counts: list[np.ndarray | None] = []      # None: each value once
        self._buckets: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        return self._buckets is None

    def add(self, values: np.ndarray, counts: np.ndarray | None = None) -> None:
        values = np.asarray(values, np.float64).ravel()
        if counts is not None:
            values, counts = positive_counts(values, np.asarray(counts, np.int64).ravel())
        if values.size == 0:
            return
        if values.min() < 0:
            raise ValueError("Quantiles holds non-negative values only")
        self.count += int(values.size) if counts is None else int(counts.sum())
        self.total += float(values.sum()) if counts is None else float(np.dot(values, counts))
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        if self._buckets is not None:
            self._buckets += _bucket_counts(values, counts)
            return
        self._values.append(values)
        self._counts.append(counts)
        if self._entries() > self.exact_max:
            self._fold()

    def _entries(self) -> int:
        return sum(v.size for v in self._values)

    def merge(self, other: "Quantiles") -> None:
        """Add ``other``'s values to this summary (``other`` is left as it was)."""
        if other.count == 0:
            return
        self.count += other.count
        self.total += other.total
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        if other._buckets is None:
            self._values.extend(other._values)
            self._counts.extend(other._counts)
        else:
            self._fold()
            self._buckets += other._buckets
        if self._buckets is not None or self._entries() > self.exact_max:
            self._fold()                       # (folds the values just taken over too)

    def _fold(self) -> None:
        if self._buckets is None:
            self._buckets = np.zeros(_BUCKETS, np.int64)
        for values, counts in zip(self._values, self._counts):
            self._buckets += _bucket_counts(values, counts)
        self._values, self._counts = [], []

    def state(self) -> dict:
        """Everything the summary holds: exact (values, counts) or its bucket counts."""
        values, counts = self._exact_pairs() if self.exact else (None, None)
        return {"count": self.count, "total": self.total, "min": self.min, "max": self.max,
                "exact_max": self.exact_max, "values": values, "counts": counts,
                "buckets": None if self.exact else self._buckets.copy()}

    @classmethod
    def from_state(cls, state: dict) -> "Quantiles":
        q = cls(int(state["exact_max"]))
        q.count, q.total = int(state["count"]), float(state["total"])
        q.min, q.max = float(state["min"]), float(state["max"])
        if state.get("buckets") is not None:
            q._buckets = np.asarray(state["buckets"], np.int64)
            if q._buckets.size != _BUCKETS:
                raise ValueError(f"{q._buckets.size} buckets, not {_BUCKETS}")
        elif q.count:
            q._values = [np.asarray(state["values"], np.float64)]
            q._counts = [np.asarray(state["counts"], np.int64)]
        return q

    def _exact_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._values:
            return np.empty(0), np.empty(0, np.int64)
        values = np.concatenate(self._values)
        counts = np.concatenate([np.ones(v.size, np.int64) if c is None else c
                                 for v, c in zip(self._values, self._counts)])
        return values, counts

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentiles(self, qs) -> list[float]:
        """``numpy.percentile(values, qs)`` (linear); within ``RELATIVE_ERROR`` once folded."""
        if self.count == 0:
            raise ValueError("no values")
        if self._buckets is None and all(c is None for c in self._counts):
            values = self._values[0] if len(self._values) == 1 else np.concatenate(self._values)
            return [float(v) for v in np.percentile(values, qs)]
        if self._buckets is None:
            return self._weighted_percentiles(qs)
        return [self._folded_percentile(q) for q in qs]

    def _weighted_percentiles(self, qs) -> list[float]:
        """``numpy.percentile`` of the values repeated by their counts, without the repeat."""
        values, counts = self._exact_pairs()
        order = np.argsort(values, kind="stable")
        values, cum = values[order], np.cumsum(counts[order])
        return [ranked_percentile(values, cum, self.count, q) for q in qs]

    def _folded_percentile(self, q: float) -> float:
        lo, hi, t = neighbour_ranks(self.count, q)
        cum = np.cumsum(self._buckets)
        a, b = (self._order_statistic(cum, k) for k in (lo, hi))
        return a + (b - a) * t

    def _order_statistic(self, cum: np.ndarray, k: int) -> float:
        if k == 0:
            return self.min
        if k == self.count - 1:
            return self.max
        index = int(np.searchsorted(cum, k, side="right"))
        if index == 0:
            return 0.0
        estimate = 2 * _GAMMA ** (index - 1 + _OFFSET) / (_GAMMA + 1)
        return min(max(estimate, self.min), self.max)


def positive_counts(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (value, count) pairs seen at least once."""
    keep = counts > 0
    return (values, counts) if keep.all() else (values[keep], counts[keep])


def neighbour_ranks(n: int, q: float) -> tuple[int, int, float]:
    """numpy's linear percentile q of n values lies between the order statistics ``lo``
    and ``hi``, a fraction ``t`` of the way."""
    rank = q / 100 * (n - 1)
    lo = int(math.floor(rank))
    return lo, min(lo + 1, n - 1), rank - lo


def ranked_percentile(sorted_values: np.ndarray, cum_counts: np.ndarray, n: int, q: float) -> float:
    """Percentile q of sorted values seen ``diff(cum_counts)`` times each (n in all)."""
    lo, hi, t = neighbour_ranks(n, q)
    a, b = (sorted_values[np.searchsorted(cum_counts, k, side="right")] for k in (lo, hi))
    return interpolate(a, b, t)


def interpolate(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation between neighbouring order statistics, in its two
    halves (exact at both ends): what makes the weighted paths equal ``numpy.percentile``."""
    return float(a + (b - a) * t) if t < 0.5 else float(b - (b - a) * (1 - t))


def _bucket_counts(values: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Counts per bucket (each value ``counts`` times); bucket 0 holds the values below SMALLEST."""
    index = np.zeros(values.size, np.int64)
    positive = values >= SMALLEST
    logs = np.log(np.minimum(values[positive], LARGEST)) / _LOG_GAMMA
    index[positive] = np.ceil(logs).astype(np.int64) - _OFFSET + 1
    if counts is None:
        return np.bincount(index, minlength=_BUCKETS)
    return np.bincount(index, weights=counts, minlength=_BUCKETS).round().astype(np.int64)
