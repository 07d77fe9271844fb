"""The golden trace is plain Arrow IPC streams: pyarrow, polars, pandas and DuckDB read it
in a few lines each and agree with kvprof on the same numbers."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pytest

import kvprof
from kvprof.analysis import analyze

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden-1.0" / "trace.arrow"
REQUESTS = Path(str(GOLDEN) + ".parts") / "requests.arrow"
REQUEST_STEPS = Path(str(GOLDEN) + ".parts") / "request_steps.arrow"


@pytest.fixture(scope="module")
def kv():
    """kvprof's answers: total output tokens, and scheduled tokens per step."""
    trace = kvprof.open_trace(str(GOLDEN))
    steps = trace["steps"]
    per_step = dict(zip(steps.column("step").to_pylist(), steps.column("total_tokens").to_pylist()))
    output = _report(trace)["tokens"]["output"]
    assert output > 0 and sum(per_step.values()) > 0
    return output, per_step


def test_pyarrow(kv):
    requests = ipc.open_stream(REQUESTS).read_all()
    rs = ipc.open_stream(REQUEST_STEPS).read_all()
    per_step = rs.group_by("step").aggregate([("tokens", "sum")])
    assert pc.sum(requests["output_tokens"]).as_py() == kv[0]
    assert dict(zip(per_step["step"].to_pylist(), per_step["tokens_sum"].to_pylist())) == \
        {s: t for s, t in kv[1].items() if t}


def test_polars(kv):
    pl = pytest.importorskip("polars")
    requests = pl.read_ipc_stream(REQUESTS)
    per_step = pl.read_ipc_stream(REQUEST_STEPS).group_by("step").agg(pl.col("tokens").sum())
    steps = pl.read_ipc_stream(GOLDEN).select("step", "total_tokens")
    joined = steps.join(per_step, on="step", how="left").fill_null(0)
    assert requests["output_tokens"].sum() == kv[0]
    assert (joined["total_tokens"] == joined["tokens"]).all()
    assert dict(zip(joined["step"], joined["total_tokens"])) == kv[1]


def test_pandas(kv):
    pytest.importorskip("pandas")
    requests = ipc.open_stream(REQUESTS).read_pandas()
    per_step = ipc.open_stream(REQUEST_STEPS).read_pandas().groupby("step")["tokens"].sum()
    steps = ipc.open_stream(GOLDEN).read_pandas().set_index("step")["total_tokens"]
    assert int(requests["output_tokens"].sum()) == kv[0]
    assert per_step.reindex(steps.index, fill_value=0).astype(int).to_dict() == kv[1]


def test_duckdb(kv):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.register("requests", ipc.open_stream(REQUESTS).read_all())
    con.register("request_steps", ipc.open_stream(REQUEST_STEPS).read_all())
    con.register("steps", ipc.open_stream(GOLDEN).read_all())
    assert con.execute("SELECT sum(output_tokens) FROM requests").fetchall() == [(kv[0],)]
    rows = con.execute("""
        SELECT s.step, s.total_tokens, coalesce(sum(r.tokens), 0) AS scheduled
        FROM steps s LEFT JOIN request_steps r USING (step)
        GROUP BY s.step, s.total_tokens ORDER BY s.step""").fetchall()
    assert all(total == scheduled for _, total, scheduled in rows)
    assert {step: total for step, total, _ in rows} == kv[1]


def test_the_streams_are_zstd_compressed_arrow():
    """What makes the above work: a standard stream, with kvprof's version in its metadata."""
    reader = ipc.open_stream(GOLDEN)
    assert reader.schema.metadata[b"kvprof.format_version"] == b"1.0"
    assert isinstance(reader.read_all(), pa.Table)


def _report(trace) -> dict:
    return analyze(trace).to_dict()
