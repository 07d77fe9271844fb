"""The analyzer against known answers and an independent pandas / NumPy reference.

Synthetic traces come from ``synthetic.py`` (a small scheduler written through
kvprof's own TraceSession, read back by the real reader), so each test knows every
token's emission time. The reference below re-derives the aggregates from the
trace's tables with pandas and never calls kvprof.analysis.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.ipc as ipc
import pytest

from kvprof.analysis import EmptyTraceError, analyze
from kvprof.analysis.latency import summarize, weighted_summary, weighted_summary_ns
from kvprof.analysis.step_model import COEFFICIENTS
from kvprof.errors import UsageError
from kvprof.format import schema as S
from kvprof.format.reader import read_trace
from kvprof.report.json_report import render

from .synthetic import GAP_NS, Engine, Spec, build, mixed_specs

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden-1.0" / "trace.arrow"
APPROX = {"rel": 1e-9, "abs": 1e-9}


# ------------------------------------------------------------------ the reference
def ref_summary(values) -> dict:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "count": 0}
    return {"mean": values.mean(), **{f"p{q}": np.percentile(values, q) for q in (50, 90, 99)},
            "count": int(values.size)}


def ref_latency(truth, finished_steps=None) -> dict:
    """Latency straight from the simulation's emission times (ms)."""
    done = [r for r in truth.finished()
            if finished_steps is None or r.finish_step in finished_steps]
    ttft, e2e, tpot, itl, queue = [], [], [], [], []
    for r in done:
        arrival = r.spec_arrival_ns
        ttft.append((r.emissions[0][1] - arrival) / 1e6)
        e2e.append((r.emissions[-1][1] - arrival) / 1e6)
        queue.append((r.first_scheduled_ns - (arrival + 200_000)) / 1e6)
        if len(r.emissions) >= 2:
            tpot.append((r.emissions[-1][1] - r.emissions[0][1]) / 1e6 / (len(r.emissions) - 1))
        itl += list(np.diff([t for _, t in r.emissions]) / 1e6)
    return {"ttft": ref_summary(ttft), "e2e": ref_summary(e2e), "tpot": ref_summary(tpot),
            "itl": ref_summary(itl), "queue": ref_summary(queue)}


def attach_arrivals(truth, path) -> None:
    """The arrival each request was given, read back from the requests table."""
    req = ipc.open_stream(str(path) + ".parts/requests.arrow").read_pandas().set_index("req")
    for r in truth.requests:
        r.spec_arrival_ns = int(req.loc[r.idx, "arrival_ns"])


def tables(path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    steps = ipc.open_stream(str(path)).read_pandas()
    parts = Path(str(path) + ".parts")
    return (steps, ipc.open_stream(parts / "requests.arrow").read_pandas(),
            ipc.open_stream(parts / "request_steps.arrow").read_pandas())


def assert_summary(found: dict, expected: dict) -> None:
    assert found["count"] == expected["count"]
    for key in ("mean", "p50", "p90", "p99"):
        if expected[key] is None:
            assert found[key] is None
        else:
            assert found[key] == pytest.approx(expected[key], **APPROX), key


def make(tmp_path, specs, engine=None, batch_rows=7, name="t.arrow"):
    path = tmp_path / name
    truth = build(path, specs, engine, batch_rows)
    attach_arrivals(truth, path)
    return path, truth


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path, truth = make(tmp_path_factory.mktemp("mixed"), mixed_specs(40, seed=1))
    return path, truth, analyze(read_trace(str(path)))


# ------------------------------------------------------------------ latency
def test_latency_equals_the_ground_truth(mixed):
    path, truth, a = mixed
    expected = ref_latency(truth)
    report = a.to_dict()["latency_ms"]
    for kind in ("ttft", "tpot", "itl", "e2e", "queue"):
        assert_summary(report[kind], expected[kind])


def test_per_request_latency_equals_the_requests_table(mixed):
    path, _, a = mixed
    _, req, _ = tables(path)
    req = req[req.finish_ns >= 0].set_index("req")
    got = a.per_request.to_pandas().set_index("req").loc[req.index]
    assert list(got.request_id) == list(req.request_id)
    np.testing.assert_allclose(got.ttft_ms, (req.first_token_ns - req.arrival_ns) / 1e6, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.e2e_ms, (req.finish_ns - req.arrival_ns) / 1e6, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.queue_ms, (req.first_scheduled_ns - req.queued_ns) / 1e6, atol=1e-9)
    multi = req.output_tokens >= 2
    np.testing.assert_allclose(got.tpot_ms[multi],
                               ((req.finish_ns - req.first_token_ns) / 1e6 / (req.output_tokens - 1))[multi],
                               atol=1e-9)
    assert got.tpot_ms[~multi].isna().all()


def test_weighted_summary_equals_numpy_on_the_repeated_values():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 100):
        values = rng.integers(0, 20, n).astype(float) * 0.5
        counts = rng.integers(0, 5, n)
        counts[0] = max(counts[0], 1)
        expected = ref_summary(np.repeat(values, counts))
        assert_summary(weighted_summary(values, counts).to_dict(), expected)
        assert_summary(summarize(np.repeat(values, counts)).to_dict(), expected)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_weighted_summary_of_ns_equals_numpy_in_ms(chunk):
    """The packed, chunked path: numpy's percentiles of the repeated values in ms, and
    the exact mean; values that do not pack (negative, too wide) take the general path."""
    rng = np.random.default_rng(chunk)
    for n, high in ((1, 10), (2, 10), (7, 1 << 40), (300, 50_000_000), (5, 1 << 62)):
        values = rng.integers(0, high, n)
        counts = rng.integers(0, 70, n).astype(np.int32)
        counts[0] = max(counts[0], 1)
        repeated = np.repeat(values, counts)
        expected = ref_summary(repeated / 1e6)
        expected["mean"] = float(sum(int(v) * int(c) for v, c in zip(values, counts))
                                 / counts.sum() / 1e6)
        found = weighted_summary_ns(values, counts, chunk)
        assert_summary(found.to_dict(), expected)
        general = weighted_summary(values / 1e6, counts)
        assert (found.p50, found.p90, found.p99) == (general.p50, general.p90, general.p99)
    assert weighted_summary_ns(np.array([-5, 3]), np.array([1, 2])).p50 == 3e-6


# ------------------------------------------------------------------ edge cases
def test_one_request_one_token(tmp_path):
    path, truth = make(tmp_path, [Spec(prompt=5, output=1)])
    report = analyze(read_trace(str(path))).to_dict()
    lat = report["latency_ms"]
    assert report["requests"] == report["requests_finished"] == 1
    assert report["tokens"] == {"input": 5, "cached_input": 0, "output": 1, "total": 6, "scheduled": 5}
    assert lat["ttft"]["mean"] == lat["e2e"]["mean"] == pytest.approx(ref_latency(truth)["ttft"]["mean"])
    assert lat["tpot"]["count"] == lat["itl"]["count"] == 0
    assert lat["tpot"]["mean"] is None and lat["itl"]["p99"] is None
    assert report["steps"] == 1 and report["step_time_model"]["coefficients"] is None
    json.loads(render(analyze(read_trace(str(path)))))


def test_chunked_prefill_emits_only_when_the_prompt_is_done(tmp_path):
    engine = Engine(max_num_batched_tokens=100)
    path, truth = make(tmp_path, [Spec(prompt=350, output=4), Spec(prompt=30, output=3, arrival_step=1)],
                       engine)
    a = analyze(read_trace(str(path)))
    long_request = truth.requests[0]
    assert long_request.first_token_step == 3          # 100 + 100 + 100 + 50 tokens
    phases = truth.rows["phase"][truth.rows["req"] == 0].tolist()
    assert phases[:4] == [S.PHASE_PREFILL, S.PHASE_CHUNKED, S.PHASE_CHUNKED, S.PHASE_CHUNKED]
    assert a.tokens.output == 7
    assert_summary(a.to_dict()["latency_ms"]["ttft"], ref_latency(truth)["ttft"])
    assert_summary(a.to_dict()["latency_ms"]["itl"], ref_latency(truth)["itl"])


def test_preemption_and_recompute(tmp_path):
    engine = Engine(max_num_batched_tokens=64)
    specs = [Spec(prompt=40, output=12, preempt_at=(5,)), Spec(prompt=100, output=6, arrival_step=1),
             Spec(prompt=20, output=8, cached=16)]
    path, truth = make(tmp_path, specs, engine)
    a = analyze(read_trace(str(path)))
    victim = truth.requests[0]
    assert victim.preemptions == 1
    assert a.kv.preemptions == 1
    assert a.kv.preempted_tokens == truth.preempted_tokens > 0
    assert a.kv.recomputed_tokens == truth.recomputed_tokens == truth.preempted_tokens
    assert S.PHASE_RESUMED in truth.rows["phase"][truth.rows["req"] == 0]
    report = a.to_dict()["latency_ms"]
    expected = ref_latency(truth)
    for kind in ("ttft", "tpot", "itl", "e2e"):
        assert_summary(report[kind], expected[kind])
    gaps = np.diff([s for s, _ in victim.emissions])
    assert (gaps > 1).any()          # the gap across the preemption is not between adjacent steps


def test_a_recomputation_in_several_chunks(tmp_path):
    """Resumed with more tokens than the budget: resumed, then recompute chunks, then decodes."""
    engine = Engine(max_num_batched_tokens=64)
    path, truth = make(tmp_path, [Spec(prompt=150, output=10, preempt_at=(6,))], engine)
    a = analyze(read_trace(str(path)))
    phases = truth.rows["phase"].tolist()
    resumed = phases.index(S.PHASE_RESUMED)
    assert phases[resumed + 1:resumed + 3] == [S.PHASE_RECOMPUTE] * 2
    assert a.tokens.output == 10
    assert a.kv.recomputed_tokens == truth.recomputed_tokens == truth.preempted_tokens
    assert_summary(a.to_dict()["latency_ms"]["itl"], ref_latency(truth)["itl"])
    assert a.batch.mean_prefill_requests == pytest.approx(
        np.mean(np.isin(truth.steps["step"], truth.rows["step"][truth.rows["phase"] != S.PHASE_DECODE])))


def test_requests_still_running_at_the_end(tmp_path):
    engine = Engine(max_steps=30, max_num_seqs=2)
    specs = [Spec(prompt=10, output=5), Spec(prompt=10, output=100), Spec(prompt=10, output=3),
             Spec(prompt=10, output=2, arrival_step=3)]
    path, truth = make(tmp_path, specs, engine)
    a = analyze(read_trace(str(path)))
    finished = truth.finished()
    assert 0 < len(finished) < len(specs)
    assert a.requests_finished == len(finished)
    assert a.requests_unfinished == a.requests - len(finished) >= 1
    assert a.tokens.output == sum(r.emitted for r in truth.requests)
    assert_summary(a.to_dict()["latency_ms"]["itl"], ref_latency(truth)["itl"])
    assert a.latency.ttft.count == len(finished)


def test_results_do_not_depend_on_batch_boundaries(tmp_path):
    specs = mixed_specs(25, seed=4)
    one, _ = make(tmp_path, specs, batch_rows=1, name="one.arrow")
    big, _ = make(tmp_path, specs, batch_rows=10_000, name="big.arrow")
    a, b = (analyze(read_trace(str(p))).to_dict() for p in (one, big))
    a.pop("trace"), b.pop("trace")
    assert a == b


def test_a_request_missing_from_the_requests_table_samples_on_decode_rows(tmp_path):
    """A cut trace may hold rows of a request whose requests row was never written."""
    path, truth = make(tmp_path, [Spec(prompt=10, output=4), Spec(prompt=12, output=6)])
    trace = read_trace(str(path))
    keep = [i for i, r in enumerate(trace["requests"].column("req").to_pylist()) if r == 0]
    trace.tables["requests"] = trace["requests"].take(keep)
    a = analyze(trace)
    decode_rows = int(((truth.rows["req"] == 1) & (truth.rows["phase"] == S.PHASE_DECODE)).sum())
    assert a.tokens.output == 4 + decode_rows
    assert a.requests == 2 and a.requests_finished == 1


# ------------------------------------------------------------------ aggregates vs pandas
def test_tokens_throughput_and_duration(mixed):
    path, truth, a = mixed
    steps, req, rs = tables(path)
    duration = (steps.t_update_end_ns.iloc[-1] - steps.t_schedule_start_ns.iloc[0]) / 1e9
    admitted = req[req.first_scheduled_step >= 0]
    output = sum(len(r.emissions) for r in truth.requests)
    report = a.to_dict()
    assert report["duration_s"] == pytest.approx(duration)
    assert report["steps"] == len(steps) and report["requests"] == rs.req.nunique()
    assert report["tokens"]["input"] == admitted.prompt_tokens.sum()
    assert report["tokens"]["cached_input"] == admitted.cached_prompt_tokens.sum()
    assert report["tokens"]["output"] == output == req.output_tokens.sum()
    assert report["tokens"]["scheduled"] == rs.tokens.sum()
    t = report["throughput"]
    assert t["output_tokens_per_s"] == pytest.approx(output / duration)
    assert t["input_tokens_per_s"] == pytest.approx(admitted.prompt_tokens.sum() / duration)
    assert t["requests_per_s"] == pytest.approx((req.finish_ns >= 0).sum() / duration)
    over = t["over_time"]
    assert sum(over["output_tokens_per_s"]) * over["bin_s"] == pytest.approx(output)
    assert sum(over["requests_per_s"]) * over["bin_s"] == pytest.approx((req.finish_ns >= 0).sum())


def test_batch_composition(mixed):
    path, _, a = mixed
    steps, _, _ = tables(path)
    b = a.to_dict()["batch"]
    prefill = steps.num_prefill_reqs + steps.num_chunked_reqs + steps.num_resumed_reqs
    assert b["mean_running"] == pytest.approx(steps.num_running.mean())
    assert b["max_running"] == steps.num_running.max()
    assert b["running_histogram"] == np.bincount(steps.num_running).tolist()
    assert b["decode_only_steps"] == ((steps.num_decode_reqs > 0) & (prefill == 0)).sum()
    assert b["mixed_steps"] == ((steps.num_decode_reqs > 0) & (prefill > 0)).sum()
    assert b["idle_steps"] == (steps.total_tokens == 0).sum()
    assert b["mean_token_budget_use"] == pytest.approx(steps.total_tokens.mean() / 512)
    assert b["steps_at_max_seqs"] == pytest.approx((steps.num_running >= 8).mean())
    assert b["prefill_token_share"] == pytest.approx(steps.prefill_tokens.sum() / steps.total_tokens.sum())


def test_kv(mixed):
    path, _, a = mixed
    steps, req, _ = tables(path)
    kv = a.to_dict()["kv"]
    admitted = req[req.first_scheduled_step >= 0]
    assert kv["blocks_total"] == 1000 and kv["bytes_per_block"] == 4096
    assert kv["peak_blocks_used"] == steps.kv_blocks_used.max()
    assert kv["mean_blocks_used"] == pytest.approx(steps.kv_blocks_used.mean())
    assert kv["prefix_hit_rate"] == pytest.approx(admitted.cached_prompt_tokens.sum()
                                                  / admitted.prompt_tokens.sum())
    assert kv["preemptions"] == steps.preemptions.sum()
    assert kv["preempted_tokens"] == steps.preempted_tokens.sum()


def test_memory_readings(mixed):
    path, _, a = mixed
    steps, _, _ = tables(path)
    forward = ipc.open_stream(str(path) + ".parts/forward-0.arrow").read_pandas()
    mem = a.to_dict()["memory_bytes"]
    assert mem["engine_rss_bytes"]["first"] == steps.rss_bytes.iloc[0]
    assert mem["engine_rss_bytes"]["max"] == steps.rss_bytes.max()
    assert mem["worker_rss_bytes"]["last"] == forward.rss_bytes.iloc[-1]
    assert mem["worker_rss_bytes"]["samples"] == len(forward)
    assert mem["gpu_used_bytes"]["samples"] == 0 and mem["gpu_used_bytes"]["max"] is None
    assert mem["kv_in_use_bytes"]["max"] == steps.kv_blocks_used.max() * 4096


# ------------------------------------------------------------------ step-time model
def test_step_model_recovers_the_simulated_coefficients(mixed):
    """The synthetic step takes the model's time, then GAP_NS until the next schedule start:
    the cycle's fixed cost holds both."""
    _, _, a = mixed
    model = a.to_dict()["step_time_model"]
    fixed, *per = Engine().model_ns
    expected = dict(zip(COEFFICIENTS, (fixed + GAP_NS, *per)))
    for name, value in expected.items():
        assert model["coefficients"][name] == pytest.approx(value, rel=1e-6), name
        low, high = model["intervals"][name]
        assert low - 1e-6 * value <= value <= high + 1e-6 * value, name
    assert model["r2"] == pytest.approx(1.0, abs=1e-9)
    assert model["unseparable"] == {} and model["alternatives"] == []


# ------------------------------------------------------------------ window
def test_window_selects_steps_by_schedule_start(mixed):
    path, truth, _ = mixed
    steps, req, _ = tables(path)
    rel = (steps.t_schedule_start_ns - steps.t_schedule_start_ns.iloc[0]) / 1e9
    lo, hi = 0.1, 0.3
    inside = steps[(rel >= lo) & (rel < hi)]
    chosen = set(inside.step)
    a = analyze(read_trace(str(path)), window=(lo, hi))
    report = a.to_dict()
    assert report["window_s"] == [lo, hi]
    assert report["steps"] == len(inside)
    assert report["duration_s"] == pytest.approx(
        (inside.t_update_end_ns.iloc[-1] - inside.t_schedule_start_ns.iloc[0]) / 1e9)
    emitted = sum(1 for r in truth.requests for s, _ in r.emissions if s in chosen)
    assert report["tokens"]["output"] == emitted
    admitted = req[req.first_scheduled_step.isin(chosen)]
    assert report["tokens"]["input"] == admitted.prompt_tokens.sum()
    assert report["batch"]["mean_running"] == pytest.approx(inside.num_running.mean())
    assert report["kv"]["peak_blocks_used"] == inside.kv_blocks_used.max()
    expected = ref_latency(truth, finished_steps=chosen)
    for kind in ("ttft", "tpot", "itl", "e2e", "queue"):
        assert_summary(report["latency_ms"][kind], expected[kind])


def test_open_windows_and_the_whole_trace_agree(mixed):
    path, _, a = mixed
    trace = read_trace(str(path))
    whole = a.to_dict()
    for window in ((None, None), (0.0, None), (None, 1e9)):
        other = analyze(trace, window=window).to_dict()
        assert other["steps"] == whole["steps"]
        assert other["tokens"] == whole["tokens"]
        assert other["latency_ms"] == whole["latency_ms"]


def test_a_window_without_steps_is_a_usage_error(mixed):
    path, _, _ = mixed
    with pytest.raises(UsageError, match="selects no step"):
        analyze(read_trace(str(path)), window=(1e6, 2e6))


# ------------------------------------------------------------------ refusals and golden
def test_empty_and_unfinished_traces_are_refused(tmp_path):
    path, _ = make(tmp_path, [Spec(prompt=10, output=50)], Engine(max_steps=5), name="running.arrow")
    with pytest.raises(EmptyTraceError, match="no request finished"):
        analyze(read_trace(str(path)))
    empty, _ = make(tmp_path, [], name="empty.arrow")
    with pytest.raises(EmptyTraceError, match="no steps"):
        analyze(read_trace(str(empty)))


def test_golden_trace_matches_the_requests_table():
    trace = read_trace(str(GOLDEN))
    a = analyze(trace)
    req = trace["requests"].to_pandas().set_index("req")
    got = a.per_request.to_pandas().set_index("req").loc[req.index]
    np.testing.assert_allclose(got.ttft_ms, (req.first_token_ns - req.arrival_ns) / 1e6, atol=1e-9)
    np.testing.assert_allclose(got.e2e_ms, (req.finish_ns - req.arrival_ns) / 1e6, atol=1e-9)
    np.testing.assert_allclose(got.tpot_ms, (req.finish_ns - req.first_token_ns) / 1e6
                               / (req.output_tokens - 1), atol=1e-9)
    assert a.tokens.output == req.output_tokens.sum()
    assert a.latency.itl.count == (req.output_tokens - 1).sum()
    assert a.kv.blocks_total == trace.run["kv"]["usable_blocks"]
    report = json.loads(render(a))
    assert report["format_version"] == "1.0"


def test_importing_the_analysis_loads_neither_numba_nor_pandas():
    code = ("import sys; import kvprof.analysis, kvprof.analysis.latency, kvprof.report.json_report; "
            "heavy = [m for m in ('numba', 'pandas', 'matplotlib', 'rich') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_results_identical_with_numba_jit_disabled(tmp_path):
    """The kernel is also plain Python: NUMBA_DISABLE_JIT=1 must give the same report."""
    import json
    import os
    import subprocess
    import sys

    golden = os.path.join(os.path.dirname(__file__), "..", "data", "golden-1.0", "trace.arrow")
    reports = []
    for disable in ("0", "1"):
        proc = subprocess.run([sys.executable, "-m", "kvprof", "analyze", "--json", golden],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "NUMBA_DISABLE_JIT": disable})
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    for report in reports:
        report.pop("trace", None)
    assert reports[0] == reports[1]
