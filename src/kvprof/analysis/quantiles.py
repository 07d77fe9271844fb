"""Percentiles of a stream too long to hold: exact while it fits, bounded error after.

``Quantiles`` keeps every value until it has ``exact_max`` of them, so every trace
of ordinary length gets ``numpy.percentile``'s exact answer (linear interpolation).
Past that it folds the values into logarithmic buckets (the DDSketch layout: bucket
``i`` holds (gamma^(i-1), gamma^i], gamma = (1 + a) / (1 - a)) and answers each
order statistic with its bucket's midpoint, within a relative error ``a`` =
``RELATIVE_ERROR`` of the true value; interpolating between two such answers keeps
that bound. Counts, sums, minimum and maximum stay exact. Two summaries merge by
adding their buckets (or values), so per-range or per-trace summaries combine
without their rows. Values must be non-negative (durations, sizes); values below
``SMALLEST`` count as zero.
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
        self._buckets: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        return self._buckets is None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        if values.size == 0:
            return
        if values.min() < 0:
            raise ValueError("Quantiles holds non-negative values only")
        self.count += int(values.size)
        self.total += float(values.sum())
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        if self._buckets is not None:
            self._buckets += _bucket_counts(values)
            return
        self._values.append(values)
        if self.count > self.exact_max:
            self._fold()

    def merge(self, other: "Quantiles") -> None:
        """Add ``other``'s values to this summary (``other`` is left as it was)."""
        if other.count == 0:
            return
        self.count += other.count
        self.total += other.total
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        if other._buckets is None:
            self._values.extend(other._values)
        else:
            self._fold()
            self._buckets += other._buckets
        if self._buckets is not None or self.count > self.exact_max:
            self._fold()                       # (folds the values just taken over too)

    def _fold(self) -> None:
        if self._buckets is None:
            self._buckets = np.zeros(_BUCKETS, np.int64)
        for values in self._values:
            self._buckets += _bucket_counts(values)
        self._values = []

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentiles(self, qs) -> list[float]:
        """``numpy.percentile(values, qs)`` (linear); within ``RELATIVE_ERROR`` once folded."""
        if self.count == 0:
            raise ValueError("no values")
        if self._buckets is None:
            values = self._values[0] if len(self._values) == 1 else np.concatenate(self._values)
            return [float(v) for v in np.percentile(values, qs)]
        return [self._folded_percentile(q) for q in qs]

    def _folded_percentile(self, q: float) -> float:
        rank = q / 100 * (self.count - 1)
        lo = int(math.floor(rank))
        hi = min(lo + 1, self.count - 1)
        cum = np.cumsum(self._buckets)
        a, b = (self._order_statistic(cum, k) for k in (lo, hi))
        return a + (b - a) * (rank - lo)

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


def _bucket_counts(values: np.ndarray) -> np.ndarray:
    """Counts per bucket; bucket 0 holds the values below SMALLEST."""
    index = np.zeros(values.size, np.int64)
    positive = values >= SMALLEST
    logs = np.log(np.minimum(values[positive], LARGEST)) / _LOG_GAMMA
    index[positive] = np.ceil(logs).astype(np.int64) - _OFFSET + 1
    return np.bincount(index, minlength=_BUCKETS)
