"""The steps table summed batch by batch: NumPy's numbers on the whole columns, and the
order checks across batch boundaries."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kvprof.analysis.step_pass import COUNTERS, KEPT, step_pass, window_mask
from kvprof.errors import TraceFormatError
from kvprof.format import schema as S

MS = 1_000_000


def steps_table(n=500, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    start = np.arange(n, dtype=np.int64) * 10 * MS + 1_000 * MS
    cols = {"step": np.arange(n) + 7, "t_schedule_start_ns": start,
            "t_schedule_end_ns": start + MS, "t_update_start_ns": start + 5 * MS,
            "t_update_end_ns": start + 6 * MS}
    for field in S.STEPS:
        if field.name not in cols:
            cols[field.name] = rng.integers(0, 1000, n)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in S.STEPS})


@pytest.mark.parametrize("window,chunk", [(None, 1), (None, 64), ((1.0, 3.0), 33), ((None, 0.5), 1000)])
def test_kept_columns_and_counters_match_numpy(window, chunk):
    table = steps_table()
    got = step_pass(table.to_batches(max_chunksize=chunk), "t.arrow", window)
    whole = {name: np.asarray(table[name]) for name in table.column_names}
    for name in KEPT:
        assert np.array_equal(got.columns[name], whole[name])
    assert np.array_equal(got.columns["prefill_reqs"], whole["num_prefill_reqs"]
                          + whole["num_chunked_reqs"] + whole["num_resumed_reqs"])
    rel = (whole["t_schedule_start_ns"] - whole["t_schedule_start_ns"][0]) / 1e9
    selected = np.ones(rel.size, bool) if window is None else \
        ((rel >= window[0]) if window[0] is not None else True) & (rel < window[1])
    assert np.array_equal(window_mask(whole["t_schedule_start_ns"], 1_000 * MS, window), selected)
    for name in COUNTERS:
        assert got.counters[name] == int(whole[name][selected].sum())
    assert got.kv_capacity == int((whole["kv_blocks_used"] + whole["kv_blocks_free"])[selected].max())


@pytest.mark.parametrize("chunk", [10, 7])
def test_out_of_order_rows_are_found_across_batches(chunk):
    table = steps_table(40)
    step = np.asarray(table["step"]).copy()
    step[20] = step[19]                      # row 20 repeats its step number
    broken = table.set_column(0, "step", pa.array(step, pa.int32()))
    with pytest.raises(TraceFormatError, match=r"t.arrow: steps row 20 \(step 26\)"):
        step_pass(broken.to_batches(max_chunksize=chunk), "t.arrow")
    start = np.asarray(table["t_schedule_start_ns"]).copy()
    start[30] = start[29] - 1                # and schedule starts going back
    broken = table.set_column(1, "t_schedule_start_ns", pa.array(start, pa.int64()))
    with pytest.raises(TraceFormatError, match="steps row 30"):
        step_pass(broken.to_batches(max_chunksize=chunk), "t.arrow")


def test_no_rows_keeps_nothing():
    got = step_pass(steps_table(3).slice(0, 0).to_batches(), "t.arrow")
    assert got.columns["step"].size == 0 and got.kv_capacity is None
    assert all(v == 0 for v in got.counters.values())
