"""How the workers of one engine kept pace with each other, step by step.

With tensor or pipeline parallelism every step runs one forward per worker rank
(the ``forward`` table's rows). A step takes as long as its slowest rank, so the
spread between ranks is time the others spend waiting. Two views, because
collectives hide one of them: under tensor parallelism the ranks meet at every
all-reduce, so their forwards *end* together and a rank that *starts* late makes
the others' forwards look long, its own short. Hence both the longest forward and
the last start are counted per rank. Durations are CUDA-event device time where
every row has one, wall clock (``t_end_ns - t_start_ns``) otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from kvprof.analysis.memory import forward_rows

NS_PER_MS = 1e6


@dataclass
class Spread:
    """A per-step difference between ranks, in ms."""

    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values_ns: np.ndarray) -> "Spread":
        ms = values_ns / NS_PER_MS
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p99), float(ms.max()))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RankPace:
    """One rank over the steps that every rank ran."""

    forward_ms_mean: float
    forward_ms_p50: float
    forward_ms_p99: float
    longest_share: float      # fraction of steps in which its forward was the longest
    last_start_share: float   # fraction of steps in which it started last
    late_start_ms_mean: float  # its start after the first rank's, mean over steps

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Ranks:
    """Skew between the ranks of one engine; ``None`` in the analysis for one rank."""

    ranks: list[int]
    steps: int                 # steps with a forward row from every rank
    steps_missing_a_rank: int  # steps some rank has no row for (not in the figures)
    time_source: str           # "cuda_events" or "wall_clock"
    per_rank: dict[int, RankPace] = field(default_factory=dict)
    duration_spread_ms: Spread | None = None   # longest forward - shortest, per step
    start_skew_ms: Spread | None = None        # last start - first start, per step
    end_skew_ms: Spread | None = None          # last end - first end, per step
    waiting_share: float = 0.0   # sum of spreads / sum of longest forwards
    late_starter: int | None = None   # the rank starting last in most steps, if clearly so

    def to_dict(self) -> dict:
        spreads = {name: getattr(self, name).to_dict() if getattr(self, name) else None
                   for name in ("duration_spread_ms", "start_skew_ms", "end_skew_ms")}
        return {"ranks": list(self.ranks), "steps": self.steps,
                "steps_missing_a_rank": self.steps_missing_a_rank,
                "time_source": self.time_source,
                "per_rank": {str(r): p.to_dict() for r, p in self.per_rank.items()},
                **spreads, "waiting_share": self.waiting_share, "late_starter": self.late_starter}


def late_starter_threshold(n_ranks: int) -> float:
    """'Clearly' the late starter: last in at least half the steps and in 1.5x its fair share."""
    return max(0.5, 1.5 / n_ranks)


def ranks(forward: Mapping[str, np.ndarray], step_range: tuple[int, int] | None) -> Ranks | None:
    """``forward``: the forward table's columns (nullable ones float64 with NaN for null)."""
    if forward["step"].size == 0:
        return None
    rows = forward_rows(forward, step_range) & (forward["step"] >= 0)
    rank_ids = np.unique(forward["rank"][rows])
    if rank_ids.size < 2:
        return None
    grid = _per_step_grid(forward, rows, rank_ids)
    complete = ~np.isnan(grid.duration).any(axis=1)
    result = Ranks([int(r) for r in rank_ids], int(complete.sum()),
                   int((~complete).sum()), grid.time_source)
    if not complete.any():
        return result
    _fill(result, grid.duration[complete], grid.start[complete], grid.end[complete])
    return result


@dataclass
class _Grid:
    duration: np.ndarray   # [step, rank] ns; NaN where the rank has no row
    start: np.ndarray
    end: np.ndarray
    time_source: str


def _per_step_grid(forward, rows: np.ndarray, rank_ids: np.ndarray) -> _Grid:
    """Steps x ranks; several rows of one rank in one step add up (their span: first start,
    last end)."""
    step = forward["step"][rows].astype(np.int64)
    start = forward["t_start_ns"][rows].astype(np.float64)
    end = forward["t_end_ns"][rows].astype(np.float64)
    device = forward["device_ns"][rows].astype(np.float64)
    on_device = not np.isnan(device).any()
    duration = device if on_device else end - start
    step_ids, step_pos = np.unique(step, return_inverse=True)
    rank_pos = np.searchsorted(rank_ids, forward["rank"][rows])
    shape = (step_ids.size, rank_ids.size)
    grid_duration = np.zeros(shape)
    seen = np.zeros(shape, bool)
    grid_start, grid_end = np.full(shape, np.inf), np.full(shape, -np.inf)
    np.add.at(grid_duration, (step_pos, rank_pos), duration)
    seen[step_pos, rank_pos] = True
    np.minimum.at(grid_start, (step_pos, rank_pos), start)
    np.maximum.at(grid_end, (step_pos, rank_pos), end)
    grid_duration[~seen] = np.nan
    return _Grid(grid_duration, grid_start, grid_end, "cuda_events" if on_device else "wall_clock")


def _fill(result: Ranks, duration: np.ndarray, start: np.ndarray, end: np.ndarray) -> None:
    steps = duration.shape[0]
    longest = duration.max(axis=1)
    late = start - start.min(axis=1, keepdims=True)
    longest_count = np.bincount(duration.argmax(axis=1), minlength=duration.shape[1])
    last_count = np.bincount(start.argmax(axis=1), minlength=duration.shape[1])
    for i, rank in enumerate(result.ranks):
        ms = duration[:, i] / NS_PER_MS
        p50, p99 = np.percentile(ms, [50, 99])
        result.per_rank[rank] = RankPace(float(ms.mean()), float(p50), float(p99),
                                         float(longest_count[i] / steps),
                                         float(last_count[i] / steps),
                                         float(late[:, i].mean() / NS_PER_MS))
    spread = longest - duration.min(axis=1)
    result.duration_spread_ms = Spread.of(spread)
    result.start_skew_ms = Spread.of(late.max(axis=1))
    result.end_skew_ms = Spread.of(end.max(axis=1) - end.min(axis=1))
    result.waiting_share = float(spread.sum() / longest.sum()) if longest.sum() > 0 else 0.0
    top = int(last_count.argmax())
    if last_count[top] / steps >= late_starter_threshold(len(result.ranks)):
        result.late_starter = result.ranks[top]
