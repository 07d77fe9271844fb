"""Skew between worker ranks, on forward rows built by hand with a known answer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvprof.analysis.ranks import late_starter_threshold, ranks

MS = 1_000_000


def forward(rows):
    """rows: (step, rank, start_ms, end_ms[, device_ms]) -> the forward table's columns."""
    cols = list(zip(*rows))
    device = cols[4] if len(cols) > 4 else [np.nan] * len(rows)
    return {"step": np.array(cols[0], np.int32), "rank": np.array(cols[1], np.int32),
            "t_start_ns": np.array(cols[2], np.int64) * MS, "t_end_ns": np.array(cols[3], np.int64) * MS,
            "device_ns": np.array(device, np.float64) * MS}


def test_one_rank_has_no_skew_to_report():
    assert ranks(forward([(0, 0, 0, 5), (1, 0, 6, 9)]), None) is None


def test_a_late_starter_under_collectives():
    # rank 1 starts 2 ms late in 3 of 4 steps; the all-reduce makes both end together,
    # so rank 0's forward is the longest exactly in those steps.
    rows = [(0, 0, 0, 10), (0, 1, 2, 10),
            (1, 0, 20, 30), (1, 1, 22, 30),
            (2, 0, 40, 50), (2, 1, 42, 50),
            (3, 0, 61, 70), (3, 1, 60, 70)]
    r = ranks(forward(rows), None)
    assert r.ranks == [0, 1] and r.steps == 4 and r.steps_missing_a_rank == 0
    assert r.time_source == "wall_clock"
    assert r.per_rank[1].last_start_share == 0.75 and r.per_rank[0].last_start_share == 0.25
    assert r.per_rank[0].longest_share == 0.75
    assert r.per_rank[1].late_start_ms_mean == pytest.approx(6 / 4)
    assert r.per_rank[0].forward_ms_mean == pytest.approx((10 + 10 + 10 + 9) / 4)
    assert r.start_skew_ms.mean == pytest.approx((2 + 2 + 2 + 1) / 4) and r.start_skew_ms.max == 2
    assert r.end_skew_ms.max == 0
    assert r.duration_spread_ms.mean == pytest.approx(7 / 4)
    assert r.waiting_share == pytest.approx(7 / 40)   # longest: 10 ms each step
    assert r.late_starter == 1   # 0.75 >= threshold 0.75 for two ranks


def test_no_late_starter_when_ranks_take_turns():
    rows = [(s, rank, 10 * s + (rank == s % 2), 10 * s + 5) for s in range(4) for rank in (0, 1)]
    r = ranks(forward(rows), None)
    assert r.per_rank[0].last_start_share == 0.5 and r.late_starter is None


def test_cuda_event_times_are_used_where_every_row_has_one():
    rows = [(0, 0, 0, 10, 4), (0, 1, 0, 10, 7), (1, 0, 20, 30, 5), (1, 1, 20, 30, 5)]
    r = ranks(forward(rows), None)
    assert r.time_source == "cuda_events"
    assert r.duration_spread_ms.max == 3 and r.per_rank[1].longest_share == 0.5


def test_steps_missing_a_rank_and_unmatched_forwards_are_left_out():
    rows = [(-1, 0, 0, 1), (-1, 1, 0, 3),         # forwards outside traced steps
            (0, 0, 10, 14), (0, 1, 10, 15),
            (1, 0, 20, 29)]                       # rank 1 has no row (cut short)
    r = ranks(forward(rows), None)
    assert r.steps == 1 and r.steps_missing_a_rank == 1
    assert r.duration_spread_ms.max == 1


def test_two_rows_of_one_rank_in_a_step_add_up():
    rows = [(0, 0, 0, 3), (0, 0, 5, 8), (0, 1, 0, 8)]
    r = ranks(forward(rows), None)
    assert r.per_rank[0].forward_ms_mean == 6 and r.per_rank[1].forward_ms_mean == 8


def test_a_step_range_selects_rows():
    rows = [(0, 0, 0, 9), (0, 1, 0, 1), (1, 0, 10, 12), (1, 1, 10, 12)]
    r = ranks(forward(rows), (1, 1))
    assert r.steps == 1 and r.duration_spread_ms.max == 0


def test_threshold_grows_with_fewer_ranks():
    assert late_starter_threshold(2) == 0.75 and late_starter_threshold(4) == 0.5
    assert late_starter_threshold(8) == 0.5


def test_json_keys():
    d = ranks(forward([(0, 0, 0, 2), (0, 1, 1, 2)]), None).to_dict()
    assert set(d) == {"ranks", "steps", "steps_missing_a_rank", "time_source", "per_rank",
                      "duration_spread_ms", "start_skew_ms", "end_skew_ms", "waiting_share",
                      "late_starter"}
    assert set(d["per_rank"]) == {"0", "1"}


# ------------------------------------------------------------- through analyze and the reports
def test_a_two_rank_trace_through_analyze_and_every_report(tmp_path, capsys):
    from kvprof.analysis import analyze
    from kvprof.cli.main import main
    from kvprof.format.reader import read_trace
    from kvprof.report import html

    from .synthetic import build, mixed_specs

    def late(step, rank):   # rank 1 starts 20 us late, except every fifth step: rank 0, 10 us
        if step % 5 == 0:
            return 10_000 if rank == 0 else 0
        return 20_000 if rank == 1 else 0

    path = tmp_path / "tp2.arrow"
    build(path, mixed_specs(20), ranks=2, late=late)
    a = analyze(read_trace(str(path)))
    steps = a.steps
    r = a.ranks
    assert r.ranks == [0, 1] and r.steps == steps and r.steps_missing_a_rank == 0
    n_rank0_late = len(range(0, steps, 5))
    assert r.per_rank[0].last_start_share == pytest.approx(n_rank0_late / steps)
    assert r.per_rank[1].late_start_ms_mean == pytest.approx(0.020 * (steps - n_rank0_late) / steps)
    assert r.start_skew_ms.max == pytest.approx(0.020) and r.end_skew_ms.max == 0
    assert r.late_starter == 1

    assert main(["analyze", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["report_version"] == "1.2" and report["ranks"]["late_starter"] == 1
    assert report["ranks"]["per_rank"]["1"]["last_start_share"] == pytest.approx(
        1 - n_rank0_late / steps)
    assert main(["analyze", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Worker ranks" in text and "rank 1 starts last in most steps" in text
    assert "<h2>Worker ranks</h2>" in html.render(a)


def test_one_rank_reports_null(tmp_path):
    from kvprof.analysis import analyze
    from kvprof.format.reader import read_trace

    from .synthetic import build, mixed_specs
    path = tmp_path / "tp1.arrow"
    build(path, mixed_specs(5))
    a = analyze(read_trace(str(path)))
    assert a.ranks is None and a.to_dict()["ranks"] is None
