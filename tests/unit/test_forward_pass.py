"""The forward table summed batch by batch: the numbers NumPy gives on the whole columns."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kvprof.analysis.forward_pass import ROW_COLUMNS, forward_pass
from kvprof.format import schema as S
from kvprof.recorder.kernels import CATEGORIES, COLUMNS


def forward_table(n_steps=300, ranks=(0,), seed=0, measured_from=40) -> pa.Table:
    """Rows per rank and step; the collector's columns null before ``measured_from``,
    gpu_used_bytes null on odd steps."""
    rng = np.random.default_rng(seed)
    step = np.repeat(np.arange(n_steps), len(ranks))
    n = step.size
    cols = {"step": step, "rank": np.tile(ranks, n_steps),
            "t_start_ns": step * 10_000 + rng.integers(0, 500, n)}
    cols["t_end_ns"] = cols["t_start_ns"] + rng.integers(3_000, 9_000, n)
    for field in S.TABLES["forward"]:
        if field.name not in cols:
            cols[field.name] = rng.integers(1, 1 << 30, n)
    arrays = {}
    for field in S.TABLES["forward"]:
        mask = None
        if field.name in COLUMNS + ("dev_records",):
            mask = step < measured_from
        elif field.name == "gpu_used_bytes":
            mask = step % 2 == 1
        arrays[field.name] = pa.array(cols[field.name], field.type, mask=mask)
    return pa.table(arrays, schema=pa.schema(S.TABLES["forward"]))


def _valid(table, name, rows):
    column = table.column(name)
    ok = rows & ~np.asarray(column.is_null())
    return np.asarray(column.fill_null(0))[ok].astype(np.float64)


@pytest.mark.parametrize("step_range,chunk", [(None, 7), ((50, 199), 64), ((0, 10), 1000)])
def test_readings_and_device_time_match_numpy(step_range, chunk):
    table = forward_table()
    got = forward_pass(table.to_batches(max_chunksize=chunk), step_range, keep_rows=False)
    step = np.asarray(table["step"])
    rows = np.ones(step.size, bool) if step_range is None else \
        (step >= step_range[0]) & (step <= step_range[1])
    rss = _valid(table, "rss_bytes", rows)
    r = got.readings["worker_rss_bytes"]
    assert (r.samples, r.first, r.last, r.min, r.max) == (rss.size, rss[0], rss[-1], rss.min(), rss.max())
    assert r.mean == pytest.approx(rss.mean(), rel=1e-15)
    gpu = _valid(table, "gpu_used_bytes", rows)
    assert got.readings["gpu_used_bytes"].samples == gpu.size
    assert got.readings["gpu_used_bytes"].max == gpu.max()
    measured = rows & ~np.asarray(table["dev_records"].is_null())
    d = got.device_time
    assert d.steps == measured.sum()
    if not measured.any():
        assert d.per_step_ns == {}
        return
    for name, column in zip(CATEGORIES, COLUMNS):
        values = _valid(table, column, measured)
        assert d.total_ns[name] == int(values.sum())
        p = d.per_step_ns[name]
        assert (p.p50, p.p90, p.max) == (np.percentile(values, 50), np.percentile(values, 90), values.max())
        assert p.mean == pytest.approx(values.mean(), rel=1e-15)
    kernel = sum(_valid(table, c, measured).sum() for c in COLUMNS)
    assert d.kernel_share_of_device_time == pytest.approx(kernel / _valid(table, "device_ns", measured).sum())
    assert got.rows is None and got.ranks_seen == 1


def test_rows_are_kept_only_when_asked_and_ranks_are_counted():
    table = forward_table(n_steps=50, ranks=(0, 1, 2))
    kept = forward_pass(table.to_batches(max_chunksize=16), (10, 19), keep_rows=True)
    assert kept.ranks_seen == 3
    assert set(kept.rows) == set(ROW_COLUMNS)
    assert kept.rows["step"].tolist() == np.repeat(np.arange(10, 20), 3).tolist()
    assert kept.rows["t_end_ns"].tolist() == np.asarray(table["t_end_ns"])[30:60].tolist()
    assert forward_pass(table.to_batches(), None, keep_rows=False).rows is None


def test_an_empty_forward_table_measures_nothing():
    got = forward_pass([], None, keep_rows=True)
    assert got.device_time.steps == 0 and got.ranks_seen == 0
    assert all(r.samples == 0 for r in got.readings.values())
    assert got.rows["step"].size == 0


def test_negative_or_missing_device_time_is_a_corrupt_trace():
    from kvprof.errors import TraceFormatError
    table = forward_table(n_steps=20, measured_from=0)
    gemm = np.asarray(table["dev_gemm_ns"]).copy()
    gemm[5] = -1
    broken = table.set_column(table.schema.get_field_index("dev_gemm_ns"), "dev_gemm_ns",
                              pa.array(gemm, pa.int64()))
    with pytest.raises(TraceFormatError, match="t.arrow: forward: dev_gemm_ns negative"):
        forward_pass(broken.to_batches(), None, False, "t.arrow")
