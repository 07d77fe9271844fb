"""What each step's GPU time went to: the CUPTI collector's per-category sums.

Read from the ``forward`` table's ``dev_*_ns`` columns (format 1.1; null where the
collector did not run). Summed kernel time can exceed ``device_ns`` when kernels
overlap on several streams, and falls short of it by the gaps between kernels, so
``kernel_share_of_device_time`` is reported, not assumed to be 1. Summed as the
forward table streams by: ``forward_pass.DeviceSums``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
