"""kvprof.trace() on a real engine: outputs untouched, every invariant of the trace holds."""
from __future__ import annotations

import pyarrow as pa
import pytest

import kvprof
from kvprof.format import schema as S

from .checks import block_identity, token_identity
from .conftest import external_id, vllm_prefix_hits

pytestmark = pytest.mark.engine

MAX_TOKENS = 24


def _workload(n=24, seed=3):
    from kvprof.models.workload import make_workload
    return make_workload(n, max_tokens=MAX_TOKENS, seed=seed, length_scale=0.15)


def _generate(llm, wl):
    llm.reset_prefix_cache()
    return llm.generate(wl.prompts(), wl.sampling_params(), use_tqdm=False)


@pytest.fixture(scope="module")
def run(engine, tmp_path_factory):
    """One untraced and one traced pass of the same greedy workload."""
    wl = _workload()
    untraced = _generate(engine, wl)
    path = tmp_path_factory.mktemp("trace") / "run.arrow"
    with kvprof.trace(engine, path) as handle:
        traced = _generate(engine, wl)
    hits = vllm_prefix_hits(traced)
    return {"wl": wl, "untraced": untraced, "traced": traced, "trace": kvprof.open_trace(path),
            "summary": handle.summary, "vllm_prefix_hits": hits}


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_outputs_identical_with_and_without_tracing(run):
    assert _tokens(run["traced"]) == _tokens(run["untraced"])


def test_greedy_outputs_identical_across_two_untraced_runs(engine, run):
    again = _generate(engine, run["wl"])
    assert _tokens(again) == _tokens(run["untraced"])


def test_text_prompts_through_the_embedded_tokenizer(engine):
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    outputs = engine.generate(["def add(a, b):", "Explain this loop"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 5]
    assert all(len(o.prompt_token_ids) > 2 for o in outputs)
    assert all(isinstance(o.outputs[0].text, str) for o in outputs)


def test_every_request_returns_exactly_max_tokens(run):
    assert all(len(t) == MAX_TOKENS for t in _tokens(run["traced"]))


def test_trace_is_complete_and_counts_match(run):
    trace = run["trace"]
    assert trace.complete, trace.warnings
    assert trace.format_version == S.FORMAT_VERSION
    assert trace["requests"].num_rows == len(run["wl"].requests)
    req = trace["requests"].to_pandas()
    assert req.req.is_unique and req.request_id.is_unique
    assert trace["steps"].num_rows == run["summary"]["steps"]
    assert trace["forward"].num_rows >= trace["steps"].num_rows


def test_token_conservation(run):
    assert token_identity(run["trace"]) == {}


def test_step_token_totals_equal_request_rows(run):
    trace = run["trace"]
    st = trace["steps"].to_pandas().set_index("step")
    per_step = trace["request_steps"].to_pandas().groupby("step").tokens.sum()
    assert (per_step == st.total_tokens.loc[per_step.index]).all()
    assert (st.prefill_tokens + st.decode_tokens == st.total_tokens).all()


def test_block_conservation(run):
    trace = run["trace"]
    assert block_identity(trace) == []
    st = trace["steps"].to_pandas()
    usable = trace.run["kv"]["usable_blocks"]
    assert (st.kv_blocks_used + st.kv_blocks_free == usable).all()
    assert st.kv_blocks_used.iloc[-1] == 0  # everything freed at the end


def test_block_events_agree_with_step_counters(run):
    trace = run["trace"]
    st = trace["steps"].to_pandas().set_index("step")
    ev = trace["block_events"].to_pandas()
    for kind, column in [(S.BLOCK_ALLOC, "blocks_allocated"), (S.BLOCK_FREE, "blocks_freed"),
                         (S.BLOCK_REVIVE, "blocks_revived"), (S.BLOCK_EVICT, "blocks_evicted")]:
        counted = ev[ev.kind == kind].groupby("step").size().reindex(st.index, fill_value=0)
        assert (counted == st[column]).all(), column
    assert (ev[ev.kind == S.BLOCK_ALLOC].req >= 0).all()   # every allocation has its request


def test_blocks_held_cover_each_request_tokens(run):
    trace = run["trace"]
    bs = trace.run["kv"]["block_size"]
    rs = trace["request_steps"].to_pandas()
    held = rs.groupby("req").new_blocks.cumsum()   # no preemption in this run
    assert (held * bs >= rs.computed + rs.tokens).all()
    assert ((held - 1) * bs < rs.computed + rs.tokens).all()   # and no block to spare


def test_request_times_match_vllm_metrics(run):
    req = run["trace"]["requests"].to_pandas()
    req["rid"] = req.request_id.map(external_id)
    req = req.set_index("rid")
    for out in run["traced"]:
        m, r = out.metrics, req.loc[out.request_id]
        assert r.output_tokens == m.num_generation_tokens == MAX_TOKENS
        assert r.preemptions == m.num_preemptions
        assert abs(r.first_token_ns / 1e9 - m.first_token_ts) < 1e-3
        assert abs(r.finish_ns / 1e9 - m.last_token_ts) < 1e-3
        assert abs(r.queued_ns / 1e9 - m.queued_ts) < 1e-3
        assert abs(r.first_scheduled_ns / 1e9 - m.scheduled_ts) < 1e-3


def test_prefix_hits_match_vllm(run):
    trace = run["trace"]
    req = trace["requests"].to_pandas()
    assert req.cached_prompt_tokens.sum() == run["vllm_prefix_hits"] > 0
    assert trace["steps"].to_pandas().prefix_hit_tokens.sum() == run["vllm_prefix_hits"]


def test_no_prompt_content_in_trace_by_default(run):
    trace = run["trace"]
    assert trace["prompts"].num_rows == 0
    list_columns = [(name, c.name) for name, t in trace.tables.items() if name != "prompts"
                    for c in t.schema if pa.types.is_list(c.type) or pa.types.is_binary(c.type)]
    assert list_columns == [("host_samples", "stack")]   # ids of code frames (py-spy), not prompts


def test_forward_rows_join_steps(run):
    trace = run["trace"]
    fw = trace["forward"].to_pandas()
    st = trace["steps"].to_pandas().set_index("step")
    fw = fw[fw.step >= 0]
    assert set(fw.step) == set(st.index)
    joined = st.loc[fw.step]
    assert (fw.t_start_ns.to_numpy() >= joined.t_schedule_end_ns.to_numpy()).all()
    assert (fw.t_end_ns.to_numpy() <= joined.t_update_start_ns.to_numpy()).all()
    assert (fw.rss_bytes > 0).all()


def test_cupti_collector_stays_off_on_the_cpu_backend_and_says_why(run):
    """The real worker process has no CUDA: the collector's columns are null, its status is
    in the worker's metadata (one reason), and ``kvprof info`` prints it."""
    from kvprof.cli.info import collector_status, render_collector
    from kvprof.format import schema as S
    trace = run["trace"]
    forward = trace["forward"]
    for column in S.ADDED_COLUMNS["forward"]:
        assert forward.column(column).null_count == forward.num_rows, column
    assert [w["collector"] for w in trace.run["workers"]] == [
        {"active": False, "reason": "no CUDA device initialised in this worker"}]
    assert render_collector(collector_status(trace)) == "inactive: no CUDA device initialised in this worker"


def test_injected_fault_leaves_engine_results_intact(engine, run, tmp_path):
    path = tmp_path / "fault.arrow"
    with kvprof.trace(engine, path, _fault_point="Scheduler.update_from_output") as handle:
        warnings_before = handle.status()["warnings_emitted"]
        outputs = _generate(engine, run["wl"])
        status = handle.status()
    assert _tokens(outputs) == _tokens(run["untraced"])
    assert status["tracing"] is False
    assert status["warnings_emitted"] == warnings_before + 1
    trace = kvprof.open_trace(path)
    assert not trace.complete
    assert any("cut short" in w for w in trace.warnings)


def test_trace_refuses_to_overwrite(engine, run, tmp_path):
    path = tmp_path / "exists.arrow"
    path.write_bytes(b"keep me")
    with pytest.raises(kvprof.TraceTargetError):
        kvprof.trace(engine, path).start()
    assert path.read_bytes() == b"keep me"


def test_analysis_latencies_match_vllm_metrics(run):
    """kvprof analyze's per-request latencies against vLLM's own RequestOutput.metrics."""
    from kvprof.analysis import analyze
    result = analyze(run["trace"])
    per_request = result.per_request.to_pandas()
    per_request.index = per_request.request_id.map(external_id)
    for out in run["traced"]:
        m, r = out.metrics, per_request.loc[out.request_id]
        decode_s = m.last_token_ts - m.first_token_ts
        assert abs(r.tpot_ms - 1e3 * decode_s / (m.num_generation_tokens - 1)) < 1.0
        assert abs((r.e2e_ms - r.ttft_ms) - 1e3 * decode_s) < 1.0
        # vLLM's own TTFT is taken in the front end, after the token's trip there:
        # kvprof's (at the EngineCore) is never later, and close.
        assert -1.0 < 1e3 * m.first_token_latency - r.ttft_ms < 25.0
    report = result.to_dict()
    assert report["tokens"]["output"] == sum(len(o.outputs[0].token_ids) for o in run["traced"])
    assert report["tokens"]["input"] == sum(len(o.prompt_token_ids) for o in run["traced"])
    assert report["requests"] == len(run["traced"]) and report["kv"]["preemptions"] == 0


def test_trace_accepts_the_llm_engine_itself(engine, run, tmp_path):
    path = tmp_path / "llm_engine.arrow"
    with kvprof.trace(engine.llm_engine, path):
        outputs = _generate(engine, run["wl"])
    assert _tokens(outputs) == _tokens(run["untraced"])
    trace = kvprof.open_trace(path)
    assert trace["requests"].num_rows == len(run["wl"].requests)
    assert token_identity(trace) == {}
