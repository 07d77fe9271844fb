"""The one pass over the forward table: memory readings, device time, and the rows ranks need.

The workers' rows are read record batch by record batch and summed into mergeable
accumulators (readings: first, last, min, max, sum; device time: sums and
``Quantiles``), so nothing is held per forward row. The pass also finds the ranks
present, for the rank analysis (its own pass: ``ranks.streamed_ranks``). Only the
host-time attribution needs rows: their five columns (step, rank, start, end, device
time) are kept when the trace has host samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvprof.analysis.arrays import batch_columns, joined
from kvprof.analysis.device import DeviceTime, PerStep
from kvprof.analysis.memory import FORWARD_READINGS, Reading, ReadingSum, forward_rows
from kvprof.analysis.quantiles import Quantiles
from kvprof.errors import TraceFormatError
from kvprof.recorder.kernels import CATEGORIES, COLUMNS

ROW_COLUMNS = ("step", "rank", "t_start_ns", "t_end_ns", "device_ns")


@dataclass
class DeviceSums:
    """The CUPTI collector's per-category times of the measured steps, as they stream by."""

    steps: int = 0
    records: int = 0
    per_category: dict[str, Quantiles] = field(
        default_factory=lambda: {name: Quantiles() for name in CATEGORIES})
    kernels_on_device_ns: float = 0.0    # kernel time of the rows that also have device_ns
    device_ns: float = 0.0

    def add(self, cols: dict, rows: np.ndarray, path: str) -> None:
        rows = rows & ~np.isnan(cols["dev_records"].astype(np.float64))
        if not rows.any():
            return
        self.steps += int(rows.sum())
        self.records += int(cols["dev_records"][rows].sum())
        device = cols["device_ns"][rows].astype(np.float64)
        measured = ~np.isnan(device)
        for name, column in zip(CATEGORIES, COLUMNS):
            values = cols[column][rows].astype(np.float64)
            if not (values >= 0).all():    # NaN too: the collector writes all or none
                raise TraceFormatError(f"{path}: forward: {column} negative or missing where "
                                       f"dev_records is set (corrupt trace?)")
            self.per_category[name].add(values)
            self.kernels_on_device_ns += float(values[measured].sum())
        self.device_ns += float(device[measured].sum())

    def result(self) -> DeviceTime:
        if not self.steps:
            return DeviceTime(0)
        totals = {name: int(q.total) for name, q in self.per_category.items()}
        kernel_ns = sum(totals.values())
        per_step = {}
        for name, q in self.per_category.items():
            p50, p90 = q.percentiles((50, 90))
            per_step[name] = PerStep(q.mean, p50, p90, q.max)
        return DeviceTime(
            steps=self.steps, total_ns=totals,
            share={name: (total / kernel_ns if kernel_ns else 0.0) for name, total in totals.items()},
            per_step_ns=per_step, records=self.records,
            kernel_share_of_device_time=(self.kernels_on_device_ns / self.device_ns
                                         if self.device_ns > 0 else None))


@dataclass
class ForwardSummary:
    """What the analyses need from the forward table, without its rows."""

    readings: dict[str, Reading]
    device_time: DeviceTime
    rows: dict[str, np.ndarray] | None   # ROW_COLUMNS of the selected rows, when kept
    rank_ids: list[int]                  # ranks with rows in the selection (steps >= 0)
    on_device: bool                      # every such row has a CUDA-event time

    @property
    def ranks_seen(self) -> int:
        return len(self.rank_ids)


def forward_pass(batches, step_range: tuple[int, int] | None, keep_rows: bool,
                 path: str = "") -> ForwardSummary:
    """One pass over ``batches`` (record batches of the forward table, every column)."""
    sums = {name: ReadingSum() for name in FORWARD_READINGS}
    device = DeviceSums()
    kept: dict[str, list[np.ndarray]] = {name: [] for name in ROW_COLUMNS}
    ranks: set[int] = set()
    on_device = True
    names = None
    for batch in batches:
        names = names or tuple(batch.schema.names)
        cols = batch_columns([batch], names)
        rows = forward_rows(cols, step_range)
        for name, column in FORWARD_READINGS.items():
            values = cols[column][rows]
            sums[name].add(values[~np.isnan(values)] if values.dtype.kind == "f" else values)
        if all(column in cols for column in COLUMNS):
            device.add(cols, rows, path)
        used = rows & (cols["step"] >= 0)
        ranks.update(np.unique(cols["rank"][used]).tolist())
        on_device = on_device and not np.isnan(cols["device_ns"][used].astype(np.float64)).any()
        if keep_rows:
            for name in ROW_COLUMNS:
                kept[name].append(cols[name][rows])
    return ForwardSummary({name: s.reading() for name, s in sums.items()}, device.result(),
                          joined(kept) if keep_rows else None, sorted(ranks), on_device)
