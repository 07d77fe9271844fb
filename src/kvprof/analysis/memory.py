"""Memory readings over the run: which memory moved, and by how much.

Each reading is summarised on its own (first, last, min, max, mean) because they
measure different things: the EngineCore's RSS, the workers' RSS, the device
(NVML), torch's allocator, and the KV blocks in use times bytes per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

FORWARD_READINGS = {
    "worker_rss_bytes": "rss_bytes",
    "gpu_used_bytes": "gpu_used_bytes",
    "torch_allocated_bytes": "torch_allocated_bytes",
    "torch_reserved_bytes": "torch_reserved_bytes",
    "torch_peak_bytes": "torch_peak_bytes",
}
SUM_SLICE = 1 << 16      # values summed in int64 at a time (a slice of 2^16 values < 2^47 B)


@dataclass
class Reading:
    """One memory series in bytes; ``samples`` == 0 means it was never measured."""

    samples: int
    first: int | None = None
    last: int | None = None
    min: int | None = None
    max: int | None = None
    mean: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Memory:
    readings: dict[str, Reading]

    def to_dict(self) -> dict:
        return {name: r.to_dict() for name, r in self.readings.items()}


@dataclass
class ReadingSum:
    """One memory series summed as it streams by. The mean comes from an exact integer
    sum, so it is the same however the series was cut into batches."""

    samples: int = 0
    first: int | None = None
    last: int | None = None
    min: int | None = None
    max: int | None = None
    total: int = 0

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        values = values.astype(np.int64, copy=False)
        low, high = int(values.min()), int(values.max())
        self.first = int(values[0]) if self.first is None else self.first
        self.last = int(values[-1])
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)
        self.samples += int(values.size)
        # int64 sums of at most SUM_SLICE values cannot overflow; Python ints add them
        self.total += sum(int(values[i:i + SUM_SLICE].sum()) for i in range(0, values.size, SUM_SLICE))

    def reading(self) -> Reading:
        if not self.samples:
            return Reading(0)
        return Reading(self.samples, self.first, self.last, self.min, self.max,
                       self.total / self.samples)


def reading(values: np.ndarray) -> Reading:
    summed = ReadingSum()
    summed.add(np.asarray(values))
    return summed.reading()


def forward_rows(forward: Mapping[str, np.ndarray], step_range: tuple[int, int] | None) -> np.ndarray:
    """Mask of the worker rows of the selected steps (all rows for the whole trace)."""
    step = forward["step"]
    if step_range is None:
        return np.ones(step.size, bool)
    return (step >= step_range[0]) & (step <= step_range[1])


def step_readings(steps: Mapping[str, np.ndarray], bytes_per_block: int | None) -> dict[str, Reading]:
    """The series read from the steps table: the EngineCore's RSS and the KV blocks in use
    (in bytes). Summed early, so that their columns need not stay per step."""
    kv_bytes = (_blocks_reading(steps["kv_blocks_used"], bytes_per_block) if bytes_per_block
                else Reading(0))
    return {"engine_rss_bytes": reading(steps["rss_bytes"]), "kv_in_use_bytes": kv_bytes}


def memory(step_series: Mapping[str, Reading], forward_readings: Mapping[str, Reading]) -> Memory:
    """``step_series``: ``step_readings``; ``forward_readings``: the workers' series, summed
    by ``forward_pass``."""
    return Memory({"engine_rss_bytes": step_series["engine_rss_bytes"], **forward_readings,
                   "kv_in_use_bytes": step_series["kv_in_use_bytes"]})


def _blocks_reading(used: np.ndarray, bytes_per_block: int) -> Reading:
    """Blocks in use times bytes per block, summed a slice at a time (not 8 bytes a step)."""
    summed = ReadingSum()
    for lo in range(0, used.size, SUM_SLICE):
        summed.add(used[lo:lo + SUM_SLICE].astype(np.int64) * bytes_per_block)
    return summed.reading()
