"""A first summary of a trace with plain NumPy: totals, throughput, latency, KV peak.

Pure: trace in, dict out. The full analyzer (numba kernels, step-time model)
builds on the same definitions.
"""
from __future__ import annotations

import numpy as np


def _pct(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99))}


def summarize(trace) -> dict:
    steps = trace["steps"]
    req = trace["requests"]
    t0 = steps.column("t_schedule_start_ns").to_numpy()
    t3 = steps.column("t_update_end_ns").to_numpy()
    duration = (t3[-1] - t0[0]) / 1e9 if len(t0) else 0.0
    finish = req.column("finish_ns").to_numpy()
    done = finish >= 0
    arrival = req.column("arrival_ns").to_numpy()[done]
    first = req.column("first_token_ns").to_numpy()[done]
    out = req.column("output_tokens").to_numpy()[done]
    e2e = (finish[done] - arrival) / 1e6
    ttft = (first - arrival) / 1e6
    multi = out > 1
    tpot = (finish[done][multi] - first[multi]) / 1e6 / (out[multi] - 1)
    output_tokens = int(req.column("output_tokens").to_numpy().sum())
    prompt_tokens = int(req.column("prompt_tokens").to_numpy().sum())
    cached = int(req.column("cached_prompt_tokens").to_numpy().sum())
    used = steps.column("kv_blocks_used").to_numpy()
    return {
        "requests": int(req.num_rows), "finished": int(done.sum()), "steps": int(steps.num_rows),
        "duration_s": duration,
        "tokens": {"input": prompt_tokens, "output": output_tokens},
        "throughput": {"output_tokens_per_s": output_tokens / duration if duration else 0.0,
                       "requests_per_s": int(done.sum()) / duration if duration else 0.0},
        "latency_ms": {"ttft": _pct(ttft), "tpot": _pct(tpot), "e2e": _pct(e2e)},
        "kv": {"peak_blocks_used": int(used.max()) if used.size else 0,
               "usable_blocks": trace.run.get("kv", {}).get("usable_blocks"),
               "bytes_per_block": trace.run.get("kv", {}).get("bytes_per_block"),
               "prefix_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
               "preemptions": int(steps.column("preemptions").to_numpy().sum())},
        "batch": {"mean_running": float(steps.column("num_running").to_numpy().mean()) if used.size else 0.0,
                  "max_running": int(steps.column("num_running").to_numpy().max()) if used.size else 0},
    }
