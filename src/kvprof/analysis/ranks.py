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
from kvprof.analysis.quantiles import Quantiles
from kvprof.analysis.step_chunks import whole_steps
from kvprof.errors import TraceFormatError

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
    def of(cls, ms: Quantiles, total_ns: float) -> "Spread":
        """``total_ns``: the values' sum in integer ns, exact in any order of chunks."""
        p50, p90, p99 = ms.percentiles((50, 90, 99))
        return cls(total_ns / ms.count / NS_PER_MS, p50, p90, p99, ms.max)

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
    on_device = not np.isnan(forward["device_ns"][rows].astype(np.float64)).any()
    selected = {name: forward[name][rows] for name in ("step", "rank", "t_start_ns", "t_end_ns",
                                                         "device_ns")}
    return _paced([selected], rank_ids, on_device)


def streamed_ranks(sources: list, step_range: tuple[int, int] | None, rank_ids,
                   on_device: bool) -> Ranks | None:
    """The same from several step-ordered sources of forward columns (one per worker
    file), merged a few batches at a time: memory does not grow with the trace.
    ``rank_ids``: the ranks with rows in the selection; ``on_device``: every such row
    has a CUDA-event time."""
    keep = lambda c: forward_rows(c, step_range) & (c["step"] >= 0)  # noqa: E731
    return _paced(whole_steps(sources, keep), np.asarray(rank_ids), on_device)


def _paced(chunks, rank_ids: np.ndarray, on_device: bool) -> Ranks | None:
    """``chunks``: selected rows, every row of a step in the same chunk."""
    if rank_ids.size < 2:
        return None
    pace = _Pace(rank_ids, on_device)
    for chunk in chunks:
        pace.add(_per_step_grid(chunk, rank_ids, on_device))
    return pace.result()


@dataclass
class _Grid:
    duration: np.ndarray   # [step, rank] ns; NaN where the rank has no row
    start: np.ndarray
    end: np.ndarray


def _per_step_grid(forward, rank_ids: np.ndarray, on_device: bool) -> _Grid:
    """Steps x ranks; several rows of one rank in one step add up (their span: first start,
    last end)."""
    step = forward["step"].astype(np.int64)
    start = forward["t_start_ns"].astype(np.float64)
    end = forward["t_end_ns"].astype(np.float64)
    duration = forward["device_ns"].astype(np.float64) if on_device else end - start
    step_ids, step_pos = np.unique(step, return_inverse=True)
    rank_pos = np.searchsorted(rank_ids, forward["rank"])
    shape = (step_ids.size, rank_ids.size)
    grid_duration = np.zeros(shape)
    seen = np.zeros(shape, bool)
    grid_start, grid_end = np.full(shape, np.inf), np.full(shape, -np.inf)
    np.add.at(grid_duration, (step_pos, rank_pos), duration)
    seen[step_pos, rank_pos] = True
    np.minimum.at(grid_start, (step_pos, rank_pos), start)
    np.maximum.at(grid_end, (step_pos, rank_pos), end)
    grid_duration[~seen] = np.nan
    return _Grid(grid_duration, grid_start, grid_end)


class _Pace:
    """What ``Ranks`` reports, summed over grids of whole steps (percentiles: ``Quantiles``)."""

    def __init__(self, rank_ids: np.ndarray, on_device: bool):
        n = rank_ids.size
        self.rank_ids, self.on_device = rank_ids, on_device
        self.steps = self.missing = 0
        self.forward_ms = [Quantiles() for _ in range(n)]
        self.late_ns, self.longest_count, self.last_count = np.zeros(n), np.zeros(n, np.int64), \
            np.zeros(n, np.int64)
        self.forward_ns = np.zeros(n)      # sums of integer ns in float64: exact, any order
        self.spread, self.start_skew, self.end_skew = Quantiles(), Quantiles(), Quantiles()
        self.spread_ns = self.start_skew_ns = self.end_skew_ns = self.longest_ns = 0.0

    def add(self, grid: _Grid) -> None:
        complete = ~np.isnan(grid.duration).any(axis=1)
        self.steps += int(complete.sum())
        self.missing += int((~complete).sum())
        if not complete.any():
            return
        duration, start, end = grid.duration[complete], grid.start[complete], grid.end[complete]
        if (duration < 0).any():
            raise TraceFormatError("forward: a forward ends before it starts (corrupt trace?)")
        n = self.rank_ids.size
        longest, late = duration.max(axis=1), start - start.min(axis=1, keepdims=True)
        for i in range(n):
            self.forward_ms[i].add(duration[:, i] / NS_PER_MS)
        self.forward_ns += duration.sum(axis=0)
        self.late_ns += late.sum(axis=0)
        self.longest_count += np.bincount(duration.argmax(axis=1), minlength=n)
        self.last_count += np.bincount(start.argmax(axis=1), minlength=n)
        spread = longest - duration.min(axis=1)
        self.spread.add(spread / NS_PER_MS)
        start_skew, end_skew = late.max(axis=1), end.max(axis=1) - end.min(axis=1)
        self.start_skew.add(start_skew / NS_PER_MS)
        self.end_skew.add(end_skew / NS_PER_MS)
        self.start_skew_ns += float(start_skew.sum())
        self.end_skew_ns += float(end_skew.sum())
        self.spread_ns += float(spread.sum())
        self.longest_ns += float(longest.sum())

    def result(self) -> Ranks:
        result = Ranks([int(r) for r in self.rank_ids], self.steps, self.missing,
                       "cuda_events" if self.on_device else "wall_clock")
        if not self.steps:
            return result
        for i, rank in enumerate(result.ranks):
            q = self.forward_ms[i]
            p50, p99 = q.percentiles((50, 99))
            result.per_rank[rank] = RankPace(float(self.forward_ns[i] / self.steps / NS_PER_MS),
                                             p50, p99,
                                             float(self.longest_count[i] / self.steps),
                                             float(self.last_count[i] / self.steps),
                                             float(self.late_ns[i] / self.steps / NS_PER_MS))
        result.duration_spread_ms = Spread.of(self.spread, self.spread_ns)
        result.start_skew_ms = Spread.of(self.start_skew, self.start_skew_ns)
        result.end_skew_ms = Spread.of(self.end_skew, self.end_skew_ns)
        result.waiting_share = self.spread_ns / self.longest_ns if self.longest_ns > 0 else 0.0
        top = int(self.last_count.argmax())
        if self.last_count[top] / self.steps >= late_starter_threshold(len(result.ranks)):
            result.late_starter = result.ranks[top]
        return result
