"""The one pass over the steps table: the columns that stay per step, the rest summed.

The steps are read record batch by record batch. Each batch is checked for order
(against the previous batch's last row too), its counters (blocks, prefix hits,
preemptions) are summed over the selected steps, and only the columns some analysis
needs step by step (the kernel's, the step-time model's, the timeline's) are copied
out: 56 of the table's 132 bytes a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvprof.analysis.arrays import GrowingColumns, batch_columns
from kvprof.errors import TraceFormatError

NS_PER_S = 1e9
KEPT = ("step", "t_schedule_start_ns", "t_update_end_ns", "num_running", "num_waiting",
        "num_decode_reqs", "prefill_tokens", "total_tokens", "kv_blocks_used", "rss_bytes")
PREFILL_REQUESTS = ("num_prefill_reqs", "num_chunked_reqs", "num_resumed_reqs")
COUNTERS = ("blocks_allocated", "blocks_freed", "blocks_revived", "blocks_evicted",
            "prefix_hit_tokens", "preemptions", "preempted_tokens")
STEP_TIMES = ("t_schedule_start_ns", "t_schedule_end_ns", "t_update_start_ns", "t_update_end_ns")
READ = tuple(dict.fromkeys(KEPT + PREFILL_REQUESTS + COUNTERS + STEP_TIMES + ("kv_blocks_free",)))


@dataclass
class StepTable:
    """Every step's kept columns (plus ``prefill_reqs``: prefill, chunked and resumed
    requests), and the counters summed over the selected steps."""

    columns: dict[str, np.ndarray]
    counters: dict[str, int] = field(default_factory=dict)
    kv_capacity: int | None = None    # largest used + free blocks of a selected step


def step_pass(batches, path: str, window=None) -> StepTable:
    """One pass over the steps' record batches; ``window`` as ``select_steps`` takes it."""
    kept = GrowingColumns()
    counters = dict.fromkeys(COUNTERS, 0)
    capacity, origin, previous, rows = None, None, None, 0
    for batch in batches:
        cols = batch_columns([batch], READ)
        if cols["step"].size == 0:
            continue
        check_order(cols, path, previous, rows)
        origin = int(cols["t_schedule_start_ns"][0]) if origin is None else origin
        selected = window_mask(cols["t_schedule_start_ns"], origin, window)
        for name in COUNTERS:
            counters[name] += int(cols[name][selected].sum(dtype=np.int64))
        if selected.any():
            most = int((cols["kv_blocks_used"][selected].astype(np.int64)
                        + cols["kv_blocks_free"][selected]).max())
            capacity = most if capacity is None else max(capacity, most)
        kept.append({**{name: cols[name] for name in KEPT},
                     "prefill_reqs": sum(cols[name] for name in PREFILL_REQUESTS)})
        previous, rows = (int(cols["step"][-1]), int(cols["t_schedule_start_ns"][-1])), rows + cols["step"].size
    return StepTable(kept.finished(KEPT + ("prefill_reqs",)), counters, capacity)


def window_mask(schedule_start_ns: np.ndarray, origin_ns: int, window) -> np.ndarray:
    """Steps whose schedule start lies in [start, end) seconds from ``origin_ns``."""
    mask = np.ones(schedule_start_ns.size, bool)
    if window is None:
        return mask
    start, end = window
    rel = (schedule_start_ns - origin_ns) / NS_PER_S
    if start is not None:
        mask &= rel >= start
    if end is not None:
        mask &= rel < end
    return mask


def check_order(steps: dict, path: str, previous: tuple[int, int] | None = None,
                first_row: int = 0) -> None:
    """What every recorded trace satisfies: increasing step numbers, schedule starts in
    order, each row's four times in order on a non-negative clock. ``previous``: the
    (step, schedule start) of the row before this batch. A corrupt trace stops here,
    with one line, instead of overflowing NumPy arithmetic later."""
    times = [steps[name] for name in STEP_TIMES]
    bad = times[0] < 0
    for earlier, later in zip(times, times[1:]):
        bad |= earlier > later
    bad[1:] |= (np.diff(steps["step"]) <= 0) | (np.diff(times[0]) < 0)
    if previous is not None:
        bad[0] |= (steps["step"][0] <= previous[0]) | (times[0][0] < previous[1])
    if bad.any():
        row = int(np.argmax(bad))
        raise TraceFormatError(f"{path}: steps row {first_row + row} (step "
                               f"{int(steps['step'][row])}): step numbers or times out of "
                               f"order (corrupt trace?)")
