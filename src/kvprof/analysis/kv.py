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


def blocks_total(run_kv: Mapping, steps: Mapping[str, np.ndarray]) -> int | None:
    """From the run metadata; else the largest used + free seen (the pool is fixed)."""
    total = run_kv.get("usable_blocks")
    if total is None and steps["kv_blocks_used"].size:
        total = int((steps["kv_blocks_used"] + steps["kv_blocks_free"]).max())
    return total


def kv(steps: Mapping[str, np.ndarray], run_kv: Mapping, prompt_tokens: int, cached_tokens: int,
       recomputed_tokens: int) -> KV:
    """``prompt_tokens`` / ``cached_tokens``: of the requests admitted in the selection."""
    used = steps["kv_blocks_used"]
    total = blocks_total(run_kv, steps)
    per_block = run_kv.get("bytes_per_block")
    peak, mean = int(used.max()), float(used.mean())
    return KV(
        blocks_total=total, bytes_per_block=per_block, block_size=run_kv.get("block_size"),
        peak_blocks_used=peak, mean_blocks_used=mean,
        peak_utilization=peak / total if total else None,
        mean_utilization=mean / total if total else None,
        peak_bytes_used=peak * per_block if per_block is not None else None,
        blocks_allocated=int(steps["blocks_allocated"].sum()),
        blocks_freed=int(steps["blocks_freed"].sum()),
        blocks_revived=int(steps["blocks_revived"].sum()),
        blocks_evicted=int(steps["blocks_evicted"].sum()),
        prefix_hit_rate=cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        prefix_hit_tokens=int(steps["prefix_hit_tokens"].sum()),
        preemptions=int(steps["preemptions"].sum()),
        preempted_tokens=int(steps["preempted_tokens"].sum(dtype=np.int64)),
        recomputed_tokens=int(recomputed_tokens),
    )
