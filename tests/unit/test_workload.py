"""Fast checks of the synthetic workload and the shipped tiny tokenizer (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path
from statistics import median

import pytest

from kvprof.models.workload import KIND_PROFILES, TASK_KINDS, make_workload

TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "src/kvprof/models/tiny_llama/tokenizer.json"


def test_same_seed_is_identical():
    assert make_workload(20, seed=3) == make_workload(20, seed=3)


def test_different_seeds_differ():
    a, b = make_workload(20, seed=0), make_workload(20, seed=1)
    assert [r.prompt_token_ids for r in a.requests] != [r.prompt_token_ids for r in b.requests]


def test_lengths_and_token_ids_in_range():
    wl = make_workload(200, max_prompt_tokens=1024, vocab_size=4000)
    for r in wl.requests:
        assert r.shared_prefix_len + 8 <= len(r.prompt_token_ids) <= 1024
        assert all(3 <= t < 4000 for t in r.prompt_token_ids)


def test_kinds_cycle_and_ids_unique():
    wl = make_workload(12)
    assert [r.task_kind for r in wl.requests[:5]] == list(TASK_KINDS)
    assert len({r.request_id for r in wl.requests}) == 12
    assert wl.requests[1].request_id == "bug_fixing-0001"


def test_shared_prefix_per_kind():
    prefixes = {}
    for seed in (0, 1):
        for r in make_workload(25, seed=seed).requests:
            prefix = r.prompt_token_ids[: r.shared_prefix_len]
            assert prefixes.setdefault(r.task_kind, prefix) == prefix
    assert len(prefixes) == len(TASK_KINDS)
    assert len({p[0] for p in prefixes.values()}) == len(TASK_KINDS)  # differ from the first token


def test_median_lengths_follow_design():
    wl = make_workload(500, seed=0)
    observed = {k: median(len(r.prompt_token_ids) for r in wl.requests if r.task_kind == k) for k in TASK_KINDS}
    assert sorted(TASK_KINDS, key=observed.get) == sorted(TASK_KINDS, key=lambda k: KIND_PROFILES[k].median_tokens)
    for k in TASK_KINDS:
        assert observed[k] == pytest.approx(KIND_PROFILES[k].median_tokens, rel=0.2)


def test_length_scale_shrinks_body_only():
    full, small = make_workload(50, seed=0), make_workload(50, seed=0, length_scale=0.1)
    assert small.total_prompt_tokens() < 0.4 * full.total_prompt_tokens()
    for f, s in zip(full.requests, small.requests):
        assert s.prompt_token_ids[: s.shared_prefix_len] == f.prompt_token_ids[: f.shared_prefix_len]


def test_prompts_shape():
    wl = make_workload(7, max_tokens=5)
    prompts = wl.prompts()
    assert len(prompts) == 7
    assert all(set(p) == {"prompt_token_ids"} and isinstance(p["prompt_token_ids"], list) for p in prompts)
    assert prompts[0]["prompt_token_ids"] == list(wl.requests[0].prompt_token_ids)
    assert wl.total_prompt_tokens() == sum(len(p["prompt_token_ids"]) for p in prompts)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError):
        make_workload(5, kinds=("nope",))
    with pytest.raises(ValueError):
        make_workload(5, max_prompt_tokens=100)


def test_shipped_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))
    assert tok.get_vocab_size() <= 4096
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    code = 'def add(a, b):\n    """Sum two numbers."""\n    return a + b  # héllo\n'
    ids = tok.encode(code).ids
    assert all(0 <= i < 4096 for i in ids)
    assert tok.decode(ids) == code
