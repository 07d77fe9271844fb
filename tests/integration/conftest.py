"""Real vLLM engines on the embedded tiny model (CPU backend, default multi-process layout).

Engines take ~30 s to start on 2 cores, so each configuration is started once per
test session and shared; tests never mock vLLM.
"""
from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def engine():
    """Prefix caching on, room for every request, the embedded tokenizer loaded."""
    from kvprof.models.engine import make_llm
    llm = make_llm(max_num_seqs=16, enforce_eager=True, with_tokenizer=True)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def small_kv_engine():
    """A KV pool of 40 blocks for 32 sequences: preemption is certain."""
    from kvprof.models.engine import make_llm
    llm = make_llm(max_num_seqs=32, num_kv_blocks=40, enforce_eager=True)
    yield llm
    shutdown(llm)


def vllm_prefix_hits(outputs) -> int:
    """vLLM's own count of prompt tokens served from the prefix cache at each request's
    first scheduling (``RequestOutput.num_cached_tokens``). Per request, unlike the
    Prometheus counters: those live in one registry per process, which a later engine
    started in the same test process resets."""
    return sum(o.num_cached_tokens or 0 for o in outputs)


def vllm_preemptions(outputs) -> int:
    """vLLM's own preemption count, summed over the requests' metrics."""
    return sum(o.metrics.num_preemptions for o in outputs)


def external_id(request_id: str) -> str:
    """vLLM appends '-<random>' to the caller's request id inside the engine."""
    return request_id.rsplit("-", 1)[0]
