"""Summaries of traces merged without their rows: the pooled requests' latencies exactly
(while every part is exact), within the stated bound once folded; totals add up; the file
round-trips; bad files are one line and exit code 2."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from kvprof.analysis import analyze
from kvprof.analysis.quantiles import RELATIVE_ERROR
from kvprof.analysis.summary import merged, summary_of
from kvprof.cli.main import main
from kvprof.format import schema as S
from kvprof.format.reader import read_trace
from kvprof.format.summary_file import read_summary, write_summary

from .test_analysis import assert_summary, ref_summary
from .test_deployment import latency_values, simulated

KINDS = ("ttft", "tpot", "itl", "e2e", "queue")


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Two traces of different lengths (two 'days'), their analyses and simulations."""
    traces = simulated(tmp_path_factory.mktemp("days"), "day{}.arrow", [(30, 5), (12, 6)])
    return [(path, truth, analyze(read_trace(str(path)))) for path, truth in traces]


def pooled(days) -> dict[str, list[float]]:
    values = [latency_values(truth) for _, truth, _ in days]
    return {kind: sum((v[kind] for v in values), []) for kind in KINDS}


def test_merged_summaries_are_the_pooled_requests(days):
    whole = merged([summary_of(a) for _, _, a in days])
    report, expected = whole.to_dict(), pooled(days)
    for kind in KINDS:
        assert_summary(report["latency_ms"][kind], ref_summary(expected[kind]))
        assert report["latency_ms"][kind]["exact"]
    analyses = [a for _, _, a in days]
    assert whole.requests_finished == sum(len(t.finished()) for _, t, _ in days) == 42
    assert whole.steps == sum(a.steps for a in analyses)
    assert whole.duration_s == pytest.approx(sum(a.duration_s for a in analyses))
    assert whole.tokens["output"] == sum(a.tokens.output for a in analyses)
    assert report["throughput"]["output_tokens_per_s"] == pytest.approx(
        whole.tokens["output"] / whole.duration_s)
    assert report["relative_error_bound"] is None


def test_percentiles_of_exact_parts_are_numpys_exactly(days):
    """Not approximately: the merged order statistics are the pooled values' own."""
    whole = merged([summary_of(a) for _, _, a in days])
    for kind in ("ttft", "e2e"):
        values = np.concatenate([a.latency.per_request_ms[kind] for _, _, a in days])
        want = [float(v) for v in np.percentile(values[~np.isnan(values)], (50, 90, 99))]
        assert whole.latency_ms[kind].percentiles((50, 90, 99)) == want


def test_folded_summaries_stay_within_the_bound(days):
    whole = merged([summary_of(a, exact_max=8) for _, _, a in days])
    assert not whole.exact and whole.to_dict()["relative_error_bound"] == RELATIVE_ERROR
    expected = pooled(days)
    for kind in KINDS:
        got, want = whole.latency_ms[kind], np.asarray(expected[kind])
        assert got.count == want.size and got.mean == pytest.approx(want.mean(), rel=1e-9)
        for value, truth in zip(got.percentiles((50, 90, 99)), np.percentile(want, (50, 90, 99))):
            assert abs(value - truth) <= RELATIVE_ERROR * truth + 1e-9, (kind, value, truth)


def test_the_file_round_trips(days, tmp_path):
    for exact_max in (None, 8):
        summary = summary_of(days[0][2], exact_max=exact_max)
        write_summary(summary, str(tmp_path / "s.kvsum"))
        back = read_summary(str(tmp_path / "s.kvsum"))
        assert back.to_dict() == summary.to_dict()


def test_analyze_then_merge_on_the_command_line(days, tmp_path, capsys):
    paths = []
    for i, (trace, _, _) in enumerate(days):
        paths.append(str(tmp_path / f"d{i}.kvsum"))
        assert main(["analyze", str(trace), "--json", "--summary", paths[-1]]) == 0
    capsys.readouterr()
    assert main(["merge", *paths, "--json", "--summary", str(tmp_path / "all.kvsum")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary_version"] == S.SUMMARY_VERSION
    assert report["traces"] == [str(p) for p, _, _ in days]
    assert_summary(report["latency_ms"]["ttft"], ref_summary(pooled(days)["ttft"]))
    again = read_summary(str(tmp_path / "all.kvsum")).to_dict()
    assert again["requests_finished"] == report["requests_finished"] == 42
    # the merged summary written over one of its inputs
    assert main(["merge", paths[0], paths[1], "--summary", paths[0]]) == 0
    assert read_summary(paths[0]).to_dict() == again
    assert main(["merge", *paths]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "kvprof merge — 2 traces" in text and "percentiles exact" in text


def test_bad_summary_files_are_one_line(days, tmp_path, capsys):
    trace = str(days[0][0])
    newer = tmp_path / "newer.kvsum"
    write_summary(summary_of(days[0][2]), str(newer))
    with pa.OSFile(str(newer), "rb") as source:
        table = ipc.open_file(source).read_all()
    meta = {**table.schema.metadata, S.META_SUMMARY_VERSION: b"2.0"}
    with pa.OSFile(str(newer), "wb") as sink, ipc.new_file(sink, table.schema.with_metadata(meta)) as w:
        w.write_table(table.replace_schema_metadata(meta))
    cases = {trace: "not a kvprof summary", str(tmp_path / "missing.kvsum"): "no such summary",
             str(newer): "summary version 2.0"}
    for path, message in cases.items():
        assert main(["merge", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvprof: error: ") and message in err and err.count("\n") == 1
    good = str(tmp_path / "good.kvsum")
    write_summary(summary_of(days[0][2]), good)
    assert main(["merge", good, "--summary", str(tmp_path / "no" / "such" / "dir.kvsum")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvprof: error: cannot write ") and err.count("\n") == 1
