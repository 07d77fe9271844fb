"""A KV pool too small for the batch: preemptions, victims and recompute cost recorded exactly."""
from __future__ import annotations

import pytest

import kvprof
from kvprof.format import schema as S

from .checks import block_identity, token_identity
from .conftest import external_id, vllm_preemptions, vllm_prefix_hits

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def run(small_kv_engine, tmp_path_factory):
    from kvprof.models.workload import make_workload
    llm = small_kv_engine
    wl = make_workload(32, max_tokens=96, seed=1, length_scale=0.1)
    untraced = llm.generate(wl.prompts(), wl.sampling_params(), use_tqdm=False)
    llm.reset_prefix_cache()
    path = tmp_path_factory.mktemp("preempt") / "run.arrow"
    with kvprof.trace(llm, path):
        traced = llm.generate(wl.prompts(), wl.sampling_params(), use_tqdm=False)
    return {"trace": kvprof.open_trace(path), "traced": traced, "untraced": untraced,
            "vllm_preemptions": vllm_preemptions(traced), "vllm_hits": vllm_prefix_hits(traced)}


def test_outputs_identical_under_preemption(run):
    assert [o.outputs[0].token_ids for o in run["traced"]] == \
        [o.outputs[0].token_ids for o in run["untraced"]]


def test_preemptions_recorded_and_match_vllm(run):
    trace = run["trace"]
    steps = trace["steps"].to_pandas()
    pre = trace["preemptions"].to_pandas()
    assert run["vllm_preemptions"] > 0
    assert steps.preemptions.sum() == len(pre) == run["vllm_preemptions"]
    assert steps.preempted_tokens.sum() == pre.computed_tokens.sum() > 0
    req = trace["requests"].to_pandas()
    per_request = {external_id(r): n for r, n in zip(req.request_id, req.preemptions)}
    assert per_request == {o.request_id: o.metrics.num_preemptions for o in run["traced"]}
    assert (pre.groupby("req").size() == req.set_index("req").preemptions[lambda s: s > 0]).all()


def test_victims_resume_and_recompute(run):
    trace = run["trace"]
    rs = trace["request_steps"].to_pandas()
    pre = trace["preemptions"].to_pandas()
    resumed = rs[rs.phase == S.PHASE_RESUMED]
    assert len(resumed) == len(pre)   # every victim came back exactly once per preemption
    assert set(resumed.req) == set(pre.req)
    assert (pre.kv_blocks_used > trace.run["kv"]["usable_blocks"] - 4).all()  # the pool was full


def test_conservation_holds_under_preemption(run):
    trace = run["trace"]
    assert token_identity(trace) == {}
    assert block_identity(trace) == []


def test_first_admission_hits_match_vllm_prefix_stats(run):
    trace = run["trace"]
    req = trace["requests"].to_pandas()
    rs = trace["request_steps"].to_pandas()
    assert req.cached_prompt_tokens.sum() == run["vllm_hits"]
    resumed_hits = rs[rs.phase == S.PHASE_RESUMED].computed.sum()
    assert trace["steps"].to_pandas().prefix_hit_tokens.sum() == run["vllm_hits"] + resumed_hits
