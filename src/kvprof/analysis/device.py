"""What each step's GPU time went to: the CUPTI collector's per-category sums.

Read from the ``forward`` table's ``dev_*_ns`` columns (format 1.1; null where the
collector did not run). Summed kernel time can exceed ``device_ns`` when kernels
overlap on several streams, and falls short of it by the gaps between kernels, so
``kernel_share_of_device_time`` is reported, not assumed to be 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from kvprof.analysis.memory import forward_rows
from kvprof.recorder.kernels import CATEGORIES, COLUMNS


@dataclass
class PerStep:
    """One category's time per measured step, in ns."""

    mean: float
    p50: float
    p90: float
    max: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DeviceTime:
    """Over the selected steps; ``steps`` == 0 means the collector measured none."""

    steps: int
    total_ns: dict[str, int] = field(default_factory=dict)
    share: dict[str, float] = field(default_factory=dict)
    per_step_ns: dict[str, PerStep] = field(default_factory=dict)
    records: int = 0
    kernel_share_of_device_time: float | None = None

    def to_dict(self) -> dict:
        return {"steps": self.steps, "total_ns": dict(self.total_ns), "share": dict(self.share),
                "per_step_ns": {k: v.to_dict() for k, v in self.per_step_ns.items()},
                "records": self.records,
                "kernel_share_of_device_time": self.kernel_share_of_device_time}


def device_time(forward: Mapping[str, np.ndarray], step_range: tuple[int, int] | None) -> DeviceTime:
    """``forward``: the forward table's columns, nullable ones as float64 with NaN for null."""
    if any(column not in forward for column in COLUMNS) or forward["step"].size == 0:
        return DeviceTime(0)
    rows = forward_rows(forward, step_range) & ~np.isnan(forward["dev_records"].astype(np.float64))
    if not rows.any():
        return DeviceTime(0)
    per = {name: forward[column][rows].astype(np.float64) for name, column in zip(CATEGORIES, COLUMNS)}
    totals = {name: int(values.sum()) for name, values in per.items()}
    kernel_ns = sum(totals.values())
    device = forward["device_ns"][rows].astype(np.float64)
    measured = ~np.isnan(device)
    share_of_device = None
    if measured.any() and device[measured].sum() > 0:
        kernels_there = sum(values[measured].sum() for values in per.values())
        share_of_device = float(kernels_there / device[measured].sum())
    return DeviceTime(
        steps=int(rows.sum()), total_ns=totals,
        share={name: (total / kernel_ns if kernel_ns else 0.0) for name, total in totals.items()},
        per_step_ns={name: PerStep(float(v.mean()), float(np.percentile(v, 50)),
                                   float(np.percentile(v, 90)), float(v.max())) for name, v in per.items()},
        records=int(forward["dev_records"][rows].sum()), kernel_share_of_device_time=share_of_device)
