"""A real, small ``kvprof sweep`` of the embedded engine, end to end.

Three batch sizes share a KV pool of 20 blocks: 1 and 4 sequences fit, 16 do not,
so the largest run preempts and the curve analysis must say that the KV pool's
capacity, not the batch size, bounds KV memory there. Expected numbers come from
the model's config and the traces' own tables, not from the sweep's report.
"""
from __future__ import annotations

import json
import math

import pytest

from kvprof.cli.main import main
from kvprof.format.reader import read_trace
from tests.integration import checks
from tests.integration.checks import kv_bytes_per_block, model_config, weights_bytes

BATCH_SIZES = (1, 4, 16)
PROMPTS, MAX_TOKENS, KV_BLOCKS = 24, 16, 20


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    code, report = run_json(["sweep", "--batch-sizes", ",".join(map(str, BATCH_SIZES)),
                             "--prompts", str(PROMPTS), "--max-tokens", str(MAX_TOKENS),
                             "--rounds", "1", "--length-scale", "0.1",
                             "--kv-blocks", str(KV_BLOCKS), "--out", str(out), "--json"])
    assert code == 0
    return out, report


def run_json(argv):
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, json.loads(buffer.getvalue()) if code == 0 else None


def test_every_batch_size_ran_at_its_concurrency(sweep):
    _, report = sweep
    runs = {r["batch_size"]: r for r in report["runs"]}
    assert sorted(runs) == list(BATCH_SIZES)
    for bs in (1, 4):
        assert runs[bs]["peak_running"] == bs and runs[bs]["preemptions"] == 0
    assert runs[16]["peak_running"] <= 16
    for run in runs.values():
        trace = read_trace(run["traces"][0])
        requests = trace["requests"]
        assert requests.num_rows == PROMPTS
        assert sum(requests.column("output_tokens").to_pylist()) == PROMPTS * MAX_TOKENS
        assert checks.token_identity(trace) == {}
        assert checks.block_identity(trace) == []


def test_preemption_in_the_small_pool_is_counted_and_explained(sweep):
    _, report = sweep
    run = next(r for r in report["runs"] if r["batch_size"] == 16)
    trace = read_trace(run["traces"][0])
    assert run["preemptions"] == trace["preemptions"].num_rows > 0
    assert run["evidence"]["kv_peak_blocks"] == KV_BLOCKS - 1   # the pool less vLLM's null block
    curve = report["curve"]
    assert "kv_capacity_limit" in curve["causes"]
    assert "preempt" in curve["explanation"]
    last = report["throughput_notes"][-1]
    assert last.startswith("bs 4→16: ") and len(report["throughput_notes"]) == 2
    if run["mean_running"] < 0.85 * 16:
        assert f"the KV pool filled ({run['preemptions']} preemptions)" in last


def test_memory_components_match_the_model_and_the_pool(sweep):
    _, report = sweep
    cfg = model_config()
    block_size = report["runs"][0]["evidence"]["block_size"]
    per_block = kv_bytes_per_block(cfg, block_size)
    for run in report["runs"]:
        memory, ev = run["memory"], run["evidence"]
        assert ev["bytes_per_block"] == per_block
        assert memory["weights"] == weights_bytes(cfg)
        assert memory["kv_pool_reserved"] == KV_BLOCKS * per_block
        trace = read_trace(run["traces"][0])
        peak_blocks = max(trace["steps"].column("kv_blocks_used").to_pylist())
        assert memory["kv_in_use_peak"] == peak_blocks * per_block
        assert memory["total"] >= memory["weights"] + memory["kv_pool_reserved"]
        assert run["kv_pool_share"] == pytest.approx(peak_blocks / KV_BLOCKS)
        assert memory["allocator_reserve"] is None           # not measurable on a CPU


def test_points_csv_gives_the_same_curve_through_kvprof_curve(sweep):
    out, report = sweep
    code, curve = run_json(["curve", str(out / "points.csv"), "--json"])
    assert code == 0
    sweep_slopes = [s["slope_per_seq"] for s in report["curve"]["segments"]]
    assert [s["slope_per_seq"] for s in curve["segments"]] == pytest.approx(sweep_slopes)
    totals = [r["memory"]["total"] for r in report["runs"]]
    expected = [(b - a) / (y - x) for (x, a), (y, b) in
                zip(zip(BATCH_SIZES, totals), zip(BATCH_SIZES[1:], totals[1:]))]
    assert sweep_slopes == pytest.approx(expected)
    assert all(math.isfinite(s) for s in sweep_slopes)


def test_reanalyze_reports_the_same_sweep(sweep):
    out, report = sweep
    code, again = run_json(["sweep", "--reanalyze", "--out", str(out), "--json"])
    assert code == 0
    assert again["runs"] == report["runs"] and again["curve"] == report["curve"]


def test_the_step_model_on_the_real_engine(sweep, capsys):
    """Non-negative costs; the scheduler model replays the engine's own steps at batch size 1
    (and its token totals at every size); each batch size is set against the analyzer's
    measured throughput; what needs more KV than the pool is said."""
    from kvprof.analysis.predict import simulate, source_from_trace
    out, report = sweep
    model = report["step_time_model"]
    assert all(v >= 0 for v in model["coefficients"].values())
    runs = {r["batch_size"]: r for r in report["runs"]}
    held = {h["batch_size"]: h for h in model["leave_one_out"]}
    assert sorted(held) == list(BATCH_SIZES)
    for bs, h in held.items():
        assert h["measured_output_tokens_per_s"] == pytest.approx(runs[bs]["output_tokens_per_s"])
        assert h["interior"] == (bs == 4)
    for bs in BATCH_SIZES:
        trace = read_trace(runs[bs]["traces"][0])
        source = source_from_trace(trace)
        steps = trace["steps"]
        busy = steps.column("total_tokens").to_numpy() > 0
        schedule = simulate(source.requests, bs, source.token_budget)
        decode = steps.column("num_decode_reqs").to_numpy()[busy]
        prefill = steps.column("prefill_tokens").to_numpy()[busy]
        requests = trace["requests"]
        outputs = sum(requests.column("output_tokens").to_pylist())
        assert schedule.decode.sum() == outputs - PROMPTS
        if bs == 1:     # one request at a time: the engine's steps exactly
            assert list(schedule.decode) == list(decode) and list(schedule.prefill) == list(prefill)
        if runs[bs]["preemptions"] == 0:   # preemption recomputes: only then the totals agree
            assert decode.sum() == outputs - PROMPTS
            assert schedule.prefill.sum() == prefill.sum()
    code, predicted = run_json(["predict", str(out), "--batch-sizes", "2,16,32", "--json"])
    assert code == 0
    at = {p["batch_size"]: p for p in predicted["predictions"]}
    assert not at[2]["extrapolated"] and at[32]["extrapolated"]
    assert at[16]["fits_kv"] is False            # the sweep preempted there
    for p in at.values():
        low, high = p["interval"]
        assert p["output_tokens_per_s"] is None or low <= p["output_tokens_per_s"] <= high
        assert p["step_ms"] > 0 and p["mean_e2e_ms"] > p["step_ms"]


@pytest.fixture(scope="module")
def fresh_sweep(tmp_path_factory):
    """Three batch sizes, two rounds each, every round on an engine of its own."""
    out = tmp_path_factory.mktemp("fresh")
    code, report = run_json(["sweep", "--batch-sizes", "1,2,4", "--prompts", "6",
                             "--max-tokens", "8", "--rounds", "2", "--length-scale", "0.1",
                             "--engine-per-round", "--out", str(out), "--json"])
    assert code == 0
    return out, report


def test_engine_per_round_starts_an_engine_per_round_interleaved(fresh_sweep):
    """Each round's trace names another EngineCore process; the rounds ran in the rotated,
    interleaved order (1, 2, 4, then 2, 4, 1) by the traces' own start times; the memory
    read once per engine counts once per round; the sweep reports its engine noise."""
    out, report = fresh_sweep
    with open(out / "manifest.json") as f:
        manifest = json.load(f)["rounds"]
    assert [(r["batch_size"], r["round"], r["engine"]) for r in manifest] == [
        (1, 0, 0), (2, 0, 1), (4, 0, 2), (2, 1, 3), (4, 1, 4), (1, 1, 5)]
    traces = [read_trace(str(out / r["trace"])) for r in manifest]
    pids = [t.end_records["engine_core"]["pid"] for t in traces]
    assert len(set(pids)) == len(pids)
    starts = [t.run["started_unix_s"] for t in traces]
    assert starts == sorted(starts)
    for run in report["runs"]:
        assert len(run["traces"]) == 2
        assert all(v is not None for v in run["memory_rounds"]["weights"])
    model = report["step_time_model"]
    assert model is not None and model["engine_spread"] is not None and model["engine_spread"] >= 0
    for held in model["leave_one_out"]:
        assert held["fresh_engines"] and len(held["round_ratios"]) == 2
