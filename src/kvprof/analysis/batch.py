"""Batch composition per step: how full the batch was, what it mixed, how much budget it used."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

HISTOGRAM_MAX = 4096   # the last bucket of running_histogram counts every larger batch too


@dataclass
class Batch:
    """Running / waiting sequences, prefill-decode mix and token-budget use over the selected steps."""

    mean_running: float
    max_running: int
    p50_running: float
    p90_running: float
    mean_waiting: float
    max_waiting: int
    running_histogram: list[int]       # index: running sequences, value: steps (capped)
    decode_only_steps: int
    prefill_only_steps: int
    mixed_steps: int
    idle_steps: int                    # no token scheduled
    mean_decode_requests: float
    mean_prefill_requests: float       # prefill + chunked (and recompute) + resumed
    prefill_token_share: float         # prefill tokens / scheduled tokens
    max_num_seqs: int | None
    steps_at_max_seqs: float | None    # share of steps with running >= max_num_seqs
    max_num_batched_tokens: int | None
    mean_token_budget_use: float | None   # mean scheduled tokens / max_num_batched_tokens
    steps_at_token_budget: float | None   # share of steps that used the whole budget

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else 0.0


def batch(steps: Mapping[str, np.ndarray], engine: Mapping) -> Batch:
    """Composition of the given (selected) steps (``step_pass`` columns); ``engine`` is the
    run's engine config."""
    running, waiting = steps["num_running"], steps["num_waiting"]
    decode = steps["num_decode_reqs"]
    prefill = steps["prefill_reqs"]        # prefill + chunked (and recompute) + resumed
    total, prefill_tokens = steps["total_tokens"], steps["prefill_tokens"]
    max_seqs, budget = engine.get("max_num_seqs"), engine.get("max_num_batched_tokens")
    p50, p90 = np.percentile(running, (50, 90))
    return Batch(
        mean_running=float(running.mean()), max_running=int(running.max()),
        p50_running=float(p50), p90_running=float(p90),
        mean_waiting=float(waiting.mean()), max_waiting=int(waiting.max()),
        running_histogram=np.bincount(np.clip(running, 0, HISTOGRAM_MAX)).tolist(),
        decode_only_steps=int(((decode > 0) & (prefill == 0)).sum()),
        prefill_only_steps=int(((decode == 0) & (prefill > 0)).sum()),
        mixed_steps=int(((decode > 0) & (prefill > 0)).sum()),
        idle_steps=int((total == 0).sum()),
        mean_decode_requests=float(decode.mean()), mean_prefill_requests=float(prefill.mean()),
        prefill_token_share=float(prefill_tokens.sum() / total.sum()) if total.sum() else 0.0,
        max_num_seqs=max_seqs,
        steps_at_max_seqs=_share(running >= max_seqs) if max_seqs else None,
        max_num_batched_tokens=budget,
        mean_token_budget_use=float(total.mean() / budget) if budget else None,
        steps_at_token_budget=_share(total >= budget) if budget else None,
    )
