"""Seeded synthetic workload mirroring a code-model benchmark's task mix.

Five task kinds, each with its own prompt-length distribution (clipped
log-normal) and a fixed per-kind system-prompt prefix so that prefix caching
has something to hit.  Prompts are raw token ids, so no tokenizer is needed and
the workload is identical on every machine for a given seed.

Pure Python + numpy: vLLM is imported lazily, only by ``sampling_params``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

TASK_KINDS: tuple[str, ...] = (
    "function_completion",
    "bug_fixing",
    "algorithm_implementation",
    "api_usage",
    "code_explanation",
)
NUM_SPECIAL_IDS = 3  # <unk>=0, <s>=1, </s>=2 are never drawn
MIN_BODY_TOKENS = 8


@dataclass(frozen=True)
class KindProfile:
    """Length model of one task kind: fixed prefix + log-normal body."""

    prefix_len: int  # shared system-prompt tokens
    median_tokens: int  # median total prompt length (prefix + body), before scaling
    sigma: float  # log-space spread of the body length


KIND_PROFILES: dict[str, KindProfile] = {
    "function_completion": KindProfile(prefix_len=64, median_tokens=300, sigma=0.5),
    "bug_fixing": KindProfile(prefix_len=160, median_tokens=1200, sigma=0.45),
    "algorithm_implementation": KindProfile(prefix_len=128, median_tokens=600, sigma=0.5),
    "api_usage": KindProfile(prefix_len=96, median_tokens=450, sigma=0.5),
    "code_explanation": KindProfile(prefix_len=192, median_tokens=900, sigma=0.45),
}


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: str
    task_kind: str
    prompt_token_ids: tuple[int, ...]
    shared_prefix_len: int


@dataclass(frozen=True)
class Workload:
    requests: tuple[WorkloadRequest, ...]
    max_tokens: int
    seed: int

    def prompts(self) -> list[dict]:
        """vLLM ``TokensPrompt``-shaped dicts, in request order."""
        return [{"prompt_token_ids": list(r.prompt_token_ids)} for r in self.requests]

    def sampling_params(self, **overrides):
        """Greedy, fixed-length decoding so every run does the same amount of work."""
        from vllm import SamplingParams

        kwargs = {"max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0.0}
        kwargs.update(overrides)
        return SamplingParams(**kwargs)

    def total_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)


def shared_prefix(kind: str, vocab_size: int = 4000) -> tuple[int, ...]:
    """The kind's system-prompt ids: seeded by the kind name, so independent of the workload seed."""
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    ids = rng.integers(NUM_SPECIAL_IDS, vocab_size, size=KIND_PROFILES[kind].prefix_len)
    return tuple(int(i) for i in ids)


def make_workload(
    num_prompts: int,
    max_tokens: int = 32,
    seed: int = 0,
    *,
    max_prompt_tokens: int = 2048,
    length_scale: float = 1.0,
    vocab_size: int = 4000,
    kinds: tuple[str, ...] = TASK_KINDS,
) -> Workload:
    """Build ``num_prompts`` requests, cycling round-robin over ``kinds``.

    ``length_scale`` scales only the random body (not the shared prefix), so a
    CPU demo can use short prompts while keeping prefix-cache behaviour.
    Prompt lengths are clipped to ``[prefix_len + 8, max_prompt_tokens]``.
    """
    if num_prompts < 0:
        raise ValueError("num_prompts must be >= 0")
    if not kinds or any(k not in KIND_PROFILES for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {TASK_KINDS}")
    if length_scale <= 0:
        raise ValueError("length_scale must be > 0")
    if vocab_size <= NUM_SPECIAL_IDS:
        raise ValueError(f"vocab_size must be > {NUM_SPECIAL_IDS}")
    longest_prefix = max(KIND_PROFILES[k].prefix_len for k in kinds)
    if max_prompt_tokens < longest_prefix + MIN_BODY_TOKENS:
        raise ValueError(f"max_prompt_tokens must be >= {longest_prefix + MIN_BODY_TOKENS}")

    rng = np.random.default_rng(seed)
    prefixes = {k: shared_prefix(k, vocab_size) for k in kinds}
    requests = []
    for i in range(num_prompts):
        kind = kinds[i % len(kinds)]
        prof = KIND_PROFILES[kind]
        body_median = prof.median_tokens - prof.prefix_len
        body = rng.lognormal(np.log(body_median), prof.sigma) * length_scale
        body_len = int(np.clip(round(body), MIN_BODY_TOKENS, max_prompt_tokens - prof.prefix_len))
        body_ids = rng.integers(NUM_SPECIAL_IDS, vocab_size, size=body_len)
        requests.append(
            WorkloadRequest(
                request_id=f"{kind}-{i:04d}",
                task_kind=kind,
                prompt_token_ids=prefixes[kind] + tuple(int(t) for t in body_ids),
                shared_prefix_len=prof.prefix_len,
            )
        )
    return Workload(requests=tuple(requests), max_tokens=max_tokens, seed=seed)
