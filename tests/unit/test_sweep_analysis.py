"""The sweep's analysis on synthetic traces: memory components and the study's tables
from known inputs (CPU and CUDA readings), computed independently here."""
from __future__ import annotations

import numpy as np
import pytest

from kvprof.analysis import analyze
from kvprof.analysis.sweep import COMPONENTS, measure_round, sweep_report
from kvprof.format.reader import read_trace
from tests.unit import synthetic as syn

WEIGHTS = 3_000_000
RSS_AT_START = 1_990_000_000


def trace_for(tmp_path, max_num_seqs: int, name: str = "t", gpu=None, worker=None, n: int = 24):
    engine = syn.Engine(max_num_seqs=max_num_seqs, usable_blocks=400)
    specs = [syn.Spec(prompt=40 + 7 * i, output=12 + i % 5) for i in range(n)]
    path = tmp_path / f"{name}-{max_num_seqs}.arrow"
    truth = syn.build(path, specs, engine, worker=worker or {
        "weights_bytes": WEIGHTS, "rss_at_start_bytes": RSS_AT_START, "cuda": False}, gpu=gpu)
    return read_trace(str(path)), truth, engine


def test_cpu_components_follow_their_definitions(tmp_path):
    trace, truth, engine = trace_for(tmp_path, 8)
    last = int(truth.steps["step"].max())
    components = measure_round(trace, 8, 0).components
    pool = (engine.usable_blocks + 1) * engine.bytes_per_block
    used = truth.steps["kv_blocks_used"] * engine.bytes_per_block
    assert components["weights"] == WEIGHTS
    assert components["kv_pool_reserved"] == pool
    assert components["kv_in_use_peak"] == used.max()
    assert components["kv_in_use_mean"] == pytest.approx(used.mean())
    assert components["activation_workspace"] == syn.worker_rss(last) - RSS_AT_START
    assert components["non_torch"] == RSS_AT_START - WEIGHTS - pool
    assert components["allocator_reserve"] is None
    assert components["engine_process"] == syn.engine_rss(last)
    assert components["total"] == syn.worker_rss(last) + syn.engine_rss(last)


def test_cuda_components_come_from_the_allocator_and_nvml(tmp_path):
    def gpu(step):   # (nvml used, allocated, reserved, peak allocated)
        return (60e9 + 1e6 * step, 40e9 + 2e5 * step, 41e9 + 5e5 * step, 45e9 + 1e6 * (step % 7))

    worker = {"weights_bytes": WEIGHTS, "cuda": True, "device_total_bytes": 80 * 10**9}
    trace, truth, engine = trace_for(tmp_path, 8, gpu=gpu, worker=worker)
    steps = truth.steps["step"]
    measure = measure_round(trace, 8, 0)
    c = measure.components
    pool = (engine.usable_blocks + 1) * engine.bytes_per_block
    used, alloc, reserved, peak = (np.array([gpu(s)[i] for s in steps]) for i in range(4))
    assert measure.device == "cuda" and measure.capacity_bytes == 80 * 10**9
    assert c["total"] == used.max()
    assert c["allocator_reserve"] == (reserved - alloc).max()
    assert c["non_torch"] == (used - reserved).max()
    assert c["activation_workspace"] == peak.max() - WEIGHTS - pool


def test_evidence_counts_what_the_trace_holds(tmp_path):
    trace, truth, engine = trace_for(tmp_path, 4)
    ev = measure_round(trace, 4, 0).evidence
    running = truth.steps["num_running"]
    busy = running > 0
    context = truth.rows["computed"] + truth.rows["tokens"]
    assert ev["peak_running"] == 4 == running.max()
    assert ev["mean_blocks_per_seq"] == pytest.approx(
        (truth.steps["kv_blocks_used"][busy] / running[busy]).mean())
    assert ev["mean_context_tokens"] == pytest.approx(context.mean())
    assert ev["token_budget"] == engine.max_num_batched_tokens
    assert ev["device"] == "cpu" and ev["preemptions"] == 0


def test_sweep_report_combines_rounds_and_compares_with_the_first_size(tmp_path):
    measures = []
    for bs in (1, 2, 4, 8):
        for r in range(2):
            trace, _, _ = trace_for(tmp_path, bs, name=f"r{r}")
            measures.append(measure_round(trace, bs, r))
    report = sweep_report(measures, {"rounds": 2}).to_dict()
    runs = report["runs"]
    assert [r["batch_size"] for r in runs] == [1, 2, 4, 8]
    by_size = {bs: [m for m in measures if m.batch_size == bs] for bs in (1, 2, 4, 8)}
    for run in runs:
        rounds = by_size[run["batch_size"]]
        tps = np.mean([m.output_tokens_per_s for m in rounds])
        assert run["output_tokens_per_s"] == pytest.approx(tps)
        assert run["speedup"] == pytest.approx(tps / np.mean([m.output_tokens_per_s for m in by_size[1]]))
        assert run["mean_e2e_ms"] == pytest.approx(np.mean([m.mean_e2e_ms for m in rounds]))
        assert set(run["memory"]) == set(COMPONENTS)
        assert run["peak_memory_bytes"] == max(m.components["total"] for m in rounds)
        assert run["peak_running"] == run["batch_size"]
    assert runs[0]["speedup"] == 1.0 and runs[0]["e2e_increase"] == 0.0
    assert {"segments", "breakpoints", "explanation", "warnings"} <= set(report["curve"])
    assert report["component_notes"]["total"].startswith("peak worker RSS")
    points = report["curve"]["components"]
    assert [len(p["rounds"]) for p in points["kv_in_use_peak"]["points"]] == [2, 2, 2, 2]
    # read once per engine start: its rounds are one reading, not replicates
    assert [len(p["rounds"]) for p in points["non_torch"]["points"]] == [1, 1, 1, 1]
    # the step-time model: each batch size predicted from the others (exact synthetic costs)
    model = report["step_time_model"]
    held = {h["batch_size"]: h for h in model["leave_one_out"]}
    assert sorted(held) == [1, 2, 4, 8]
    for bs, h in held.items():
        rates = [m.output_tokens_per_s for m in by_size[bs]]
        assert h["measured_range"] == [min(rates), max(rates)]
        assert h["predicted_output_tokens_per_s"] == pytest.approx(np.mean(rates), rel=2e-3), bs
        assert h["interior"] == (bs in (2, 4)) and h["extrapolated"] == (bs == 8)
    assert len(model["notes"]) == 1 + 3 and model["notes"][1].startswith("bs 1→2 ")


def test_mean_e2e_is_the_analyzers(tmp_path):
    trace, _, _ = trace_for(tmp_path, 4)
    e2e = analyze(trace).per_request.column("e2e_ms").to_numpy()
    assert measure_round(trace, 4, 0).mean_e2e_ms == pytest.approx(e2e.mean())


def test_no_sharing_when_every_sequence_holds_its_own_blocks(tmp_path):
    """The synthetic engine gives every sequence its own blocks (no prefix sharing),
    through chunking and preemption: the measure must say 0 exactly."""
    engine = syn.Engine(max_num_seqs=8, usable_blocks=400)
    truth = syn.build(tmp_path / "m.arrow", syn.mixed_specs(40), engine)
    ev = measure_round(read_trace(str(tmp_path / "m.arrow")), 8, 0).evidence
    finish = {r.idx: r.finish_step for r in truth.requests}
    rows = truth.rows
    alive = np.array([finish[q] != s for q, s in zip(rows["req"], rows["step"])])
    needed = -(-(rows["computed"] + rows["tokens"])[alive] // engine.block_size)
    assert ev["kv_sharing"] == 0.0
    assert ev["mean_unshared_blocks_per_seq"] == pytest.approx(needed.sum() / alive.sum())


def test_throughput_notes_split_each_gain_into_batch_and_step_time():
    from kvprof.analysis.sweep import throughput_notes

    def run(bs, tps, running, tpot, preemptions=0, queue=1.0):
        return {"batch_size": bs, "output_tokens_per_s": tps, "mean_running": running,
                "mean_tpot_ms": tpot, "preemptions": preemptions, "mean_queue_ms": queue,
                "mean_ttft_ms": 100.0}

    notes = throughput_notes([run(8, 400.0, 8.0, 20.0), run(16, 640.0, 16.0, 25.0),
                              run(32, 600.0, 20.0, 33.3, preemptions=7, queue=80.0)], prompts=64)
    assert notes[0] == ("bs 8→16: output tokens/s x1.60 ≈ mean running 8.0→16.0 (x2.00) over "
                        "time per output token 20.0→25.0 ms (x1.25).")
    assert notes[1].endswith("(x1.33); the batch was not kept full (20.0 of 32 on average: the KV "
                             "pool filled (7 preemptions); 64 prompts for 32 slots: the closed loop "
                             "drains while the last requests finish; requests waited 80 ms on "
                             "average for admission).")


def test_latency_notes_split_end_to_end_into_first_token_and_decode():
    from kvprof.analysis.sweep import latency_notes
    runs = [{"batch_size": 8, "mean_e2e_ms": 500.0, "mean_ttft_ms": 100.0, "mean_tpot_ms": 12.5,
             "mean_queue_ms": 0.4},
            {"batch_size": 16, "mean_e2e_ms": 900.0, "mean_ttft_ms": 250.0, "mean_tpot_ms": 20.0,
             "mean_queue_ms": 30.0}]
    assert latency_notes(runs) == [
        "bs 8→16: end-to-end +400 ms = time to first token +150 ms (queue 0→30 ms) "
        "+ decode +250 ms (TPOT 12.5→20.0 ms)."]


@pytest.mark.parametrize("engines", [(None, None), (0, 1)])
def test_rounds_on_fresh_engines_are_replicates(tmp_path, engines):
    """One engine ran both rounds (engines None): the second round's RSS at trace start
    holds what the first grew, so its CPU workspace is counted from the first round's start,
    and what is read once per engine start is one reading. Each round on its own engine:
    each is measured from its own start and every reading is a replicate."""
    from kvprof.analysis.sweep import fresh_engines
    measures = []
    for bs in (1, 2, 4):
        for r, engine in enumerate(engines):
            trace, _, _ = trace_for(tmp_path, bs, name=f"r{r}")
            m = measure_round(trace, bs, r, engine)
            m.worker_rss_at_start = 100 + 50 * r
            m.components["activation_workspace"] = 10.0
            measures.append(m)
    report = sweep_report(measures, {"rounds": 2})
    fresh = engines[0] is not None
    assert all(fresh_engines(run.rounds) == fresh for run in report.runs)
    assert [m.components["activation_workspace"] for m in measures[:2]] == \
        ([10.0, 10.0] if fresh else [10.0, 60.0])
    points = report.to_dict()["curve"]["components"]["non_torch"]["points"]
    assert [len(p["rounds"]) for p in points] == [2 if fresh else 1] * 3


def test_engine_per_round_interleaves_and_rotates_the_rounds():
    from kvprof.models.sweep_runner import SweepPlan
    assert SweepPlan(batch_sizes=(1, 4, 8), rounds=2).schedule() == [(1, (0, 1)), (4, (0, 1)),
                                                                      (8, (0, 1))]
    assert SweepPlan(batch_sizes=(1, 4, 8), rounds=4, engine_per_round=True).schedule() == [
        (1, (0,)), (4, (0,)), (8, (0,)), (4, (1,)), (8, (1,)), (1, (1,)),
        (8, (2,)), (1, (2,)), (4, (2,)), (1, (3,)), (4, (3,)), (8, (3,))]
