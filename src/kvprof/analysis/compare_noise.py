"""Is a difference between runs more than run-to-run noise?

Two ways, chosen per comparison and stated in its report:

- **rounds**: every run has at least two rounds (a sweep folder's rounds of one batch
  size). A difference is significant when it is larger than the largest difference seen
  between two rounds of the same run (max − min over its rounds, the larger of the runs).
- **bootstrap**: otherwise. Each run's units (finished requests, steps, or inter-token
  gaps, as the metric says) are resampled with replacement, independently per run and
  per round, ``resamples`` times with a seeded generator; the difference is significant
  when the central ``confidence`` interval of the resampled differences excludes zero.

A peak, a fitted model term or a memory reading has no units to resample: without
rounds its significance is None (not tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvprof.analysis.latency import weighted_summary

RESAMPLES = 400
CONFIDENCE = 0.95
CHUNK = 64            # resamples drawn at once: bounded memory on long traces


@dataclass
class Noise:
    """How significance is decided in one comparison (the report states it)."""

    method: str          # "rounds" or "bootstrap"
    resamples: int = RESAMPLES
    confidence: float = CONFIDENCE
    seed: int = 0

    def to_dict(self) -> dict:
        if self.method == "rounds":
            return {"method": "rounds",
                    "rule": "significant when |difference of the means over rounds| exceeds the "
                            "largest difference between two rounds of the same run"}
        return {"method": "bootstrap", "resamples": self.resamples, "confidence": self.confidence,
                "seed": self.seed,
                "rule": f"significant when the central {self.confidence:.0%} interval of the "
                        f"difference, resampling each run's requests, steps or inter-token gaps "
                        f"with replacement, excludes zero"}


def replicates(units: dict[str, np.ndarray], statistic: Callable, resamples: int,
               rng: np.random.Generator) -> np.ndarray:
    """``statistic`` over ``resamples`` resamples of the rows of ``units`` (columns of equal
    length); the statistic takes columns of shape (k, n) and reduces the last axis."""
    n = len(next(iter(units.values())))
    if n == 0:
        return np.full(resamples, np.nan)
    out = np.empty(resamples)
    for lo in range(0, resamples, CHUNK):
        k = min(CHUNK, resamples - lo)
        index = rng.integers(0, n, size=(k, n))
        out[lo:lo + k] = statistic({name: col[index] for name, col in units.items()})
    return out


def itl_replicates(values: np.ndarray, counts: np.ndarray, stats: tuple[str, ...],
                   resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """ITL summaries (``stats``: mean, p50, ...) over resamples of its (gap, count) groups:
    most gaps repeat per step, so a group, not a gap, is the unit."""
    out = {stat: np.full(resamples, np.nan) for stat in stats}
    if values.size == 0:
        return out
    for i in range(resamples):
        pick = rng.integers(0, values.size, values.size)
        summary = weighted_summary(values[pick], counts[pick])
        for stat in stats:
            out[stat][i] = getattr(summary, stat)
    return out


def bootstrap_test(base: np.ndarray, other: np.ndarray, confidence: float) -> tuple[bool | None, list]:
    """(significant, interval of the difference) from two runs' replicates."""
    diff = other - base
    diff = diff[~np.isnan(diff)]
    if diff.size == 0:
        return None, None
    tail = (1 - confidence) / 2 * 100
    lo, hi = (float(v) for v in np.percentile(diff, (tail, 100 - tail)))
    return bool(lo > 0 or hi < 0), [lo, hi]


def rounds_test(base: list[float], other: list[float]) -> tuple[bool | None, list]:
    """(significant, [−noise, +noise]): the difference of means against the largest
    within-run spread of the rounds."""
    base = [v for v in base if v is not None and np.isfinite(v)]
    other = [v for v in other if v is not None and np.isfinite(v)]
    if len(base) < 2 or len(other) < 2:
        return None, None
    noise = max(max(base) - min(base), max(other) - min(other))
    diff = float(np.mean(other) - np.mean(base))
    return bool(abs(diff) > noise), [-noise, noise]
