"""Tensor parallel 2 on the CPU backend: one forward row per rank per step, and the rank
skew that ``kvprof analyze`` reports equals what the forward table says, computed apart."""
from __future__ import annotations

import pytest

import kvprof
from kvprof.analysis import analyze
from kvprof.format.reader import read_trace

from .checks import block_identity, token_identity
from .conftest import shutdown

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tp2_trace(tmp_path_factory):
    """One run of a tensor-parallel-2 engine (two workers, one per core)."""
    from kvprof.models.engine import make_llm
    from kvprof.models.workload import make_workload
    path = tmp_path_factory.mktemp("tp2") / "tp2.arrow"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")   # vLLM refuses two workers on one node
        llm = make_llm(tensor_parallel_size=2, max_num_seqs=8, enforce_eager=True)
    try:
        workload = make_workload(12, max_tokens=10, seed=5, length_scale=0.1)
        with kvprof.trace(llm, path) as handle:
            outputs = llm.generate(workload.prompts(), workload.sampling_params(), use_tqdm=False)
    finally:
        shutdown(llm)
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == 120
    return read_trace(path), handle.summary


def test_every_rank_records_every_forward_and_closes(tp2_trace):
    trace, summary = tp2_trace
    assert trace.complete, trace.warnings
    assert sorted(w["rank"] for w in trace.run["workers"]) == [0, 1]
    forward = trace["forward"].to_pandas()
    forward = forward[forward.step >= 0]
    steps = trace["steps"].to_pandas()
    ran = set(steps.step[steps.total_tokens > 0])
    for rank in (0, 1):
        assert ran <= set(forward.step[forward["rank"] == rank]), rank
    assert token_identity(trace) == {} and block_identity(trace) == []


def test_rank_skew_equals_the_forward_table(tp2_trace):
    trace, _ = tp2_trace
    r = analyze(trace).ranks
    forward = trace["forward"].to_pandas()
    forward = forward[forward.step >= 0].assign(ns=lambda f: f.t_end_ns - f.t_start_ns)
    per_step = forward.groupby(["step", "rank"]).agg(ns=("ns", "sum"), start=("t_start_ns", "min"))
    ns = per_step.ns.unstack().dropna()
    start = per_step.start.unstack().dropna()
    assert r.ranks == [0, 1] and r.time_source == "wall_clock"
    assert r.steps == len(ns) and r.steps_missing_a_rank == 0
    spread_ms = (ns.max(axis=1) - ns.min(axis=1)) / 1e6
    assert r.duration_spread_ms.mean == pytest.approx(spread_ms.mean())
    assert r.duration_spread_ms.max == pytest.approx(spread_ms.max())
    skew_ms = (start.max(axis=1) - start.min(axis=1)) / 1e6
    assert r.start_skew_ms.mean == pytest.approx(skew_ms.mean())
    for rank in (0, 1):
        assert r.per_rank[rank].forward_ms_mean == pytest.approx(ns[rank].mean() / 1e6)
        late_share = ((start[rank] == start.max(axis=1)) & (start[1 - rank] != start[rank])).mean()
        assert r.per_rank[rank].last_start_share >= late_share
    assert r.per_rank[0].last_start_share + r.per_rank[1].last_start_share == pytest.approx(1)
    assert 0 <= r.waiting_share < 1
