"""KV-cache occupancy, prefix hits and what preemption cost, over the selected steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass
class KV:
    """Blocks in use (after each step's update), prefix-cache hits, preemptions and recompute."""

    blocks_total: int | None          # usable blocks (the pool less vLLM's null block)
    bytes_per_block: int | None
    block_size: int | None            # tokens per block
    peak_blocks_used: int
    mean_blocks_used: float           # mean over steps
    peak_utilization: float | None    # peak / total
    mean_utilization: float | None
    peak_bytes_used: int | None
    blocks_allocated: int
    blocks_freed: int
    blocks_revived: int
    blocks_evicted: int
    prefix_hit_rate: float            # cached prompt tokens / prompt tokens of admitted requests
    prefix_hit_tokens: int            # all prefix hits, admissions and resumptions
    preemptions: int
    preempted_tokens: int             # computed tokens thrown away by preemptions
    recomputed_tokens: int            # tokens computed a second time after a resume

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def blocks_used(steps: Mapping[str, np.ndarray]) -> tuple[int, float]:
    """Peak and mean of the selected steps' blocks in use (what ``kv`` needs of them
    step by step: taken before the column is let go)."""
    used = steps["kv_blocks_used"]
    return int(used.max()), float(used.mean())


def kv(used: tuple[int, float], counters: Mapping[str, int], capacity: int | None,
       run_kv: Mapping, prompt_tokens: int, cached_tokens: int, recomputed_tokens: int) -> KV:
    """``used``: ``blocks_used`` of the selected steps; ``counters``: their block,
    prefix-hit and preemption columns summed; ``capacity``: their largest used + free
    blocks (the pool size when the run metadata lacks it). ``prompt_tokens`` /
    ``cached_tokens``: of the requests admitted in the selection."""
    total = run_kv.get("usable_blocks")
    total = capacity if total is None else total
    per_block = run_kv.get("bytes_per_block")
    peak, mean = used
    return KV(
        blocks_total=total, bytes_per_block=per_block, block_size=run_kv.get("block_size"),
        peak_blocks_used=peak, mean_blocks_used=mean,
        peak_utilization=peak / total if total else None,
        mean_utilization=mean / total if total else None,
        peak_bytes_used=peak * per_block if per_block is not None else None,
        blocks_allocated=counters["blocks_allocated"], blocks_freed=counters["blocks_freed"],
        blocks_revived=counters["blocks_revived"], blocks_evicted=counters["blocks_evicted"],
        prefix_hit_rate=cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        prefix_hit_tokens=counters["prefix_hit_tokens"], preemptions=counters["preemptions"],
        preempted_tokens=counters["preempted_tokens"], recomputed_tokens=int(recomputed_tokens),
    )
