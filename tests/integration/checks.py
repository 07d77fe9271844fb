"""Independent checks of a trace's invariants, shared by the tracer tests.

Written with pandas, apart from kvprof's own analysis code, so that an error in
one is not silently repeated in the other.
"""
from __future__ import annotations

import json

import numpy as np

from kvprof.format import schema as S
from kvprof.models.engine import tiny_model_path


def token_identity(trace) -> dict:
    """Per request: scheduled tokens == prompt + output - 1 - first hits + lost - resume hits."""
    rs = trace["request_steps"].to_pandas()
    req = trace["requests"].to_pandas().set_index("req")
    pre = trace["preemptions"].to_pandas().groupby("req")["computed_tokens"].sum()
    problems = {}
    for idx, rows in rs.groupby("req", sort=False):
        r = req.loc[idx]
        if r.finish_ns < 0:
            continue
        resumed = rows[rows.phase == S.PHASE_RESUMED]
        expected = (r.prompt_tokens + r.output_tokens - 1 - r.cached_prompt_tokens
                    + pre.get(idx, 0) - resumed.computed.sum())
        if rows.tokens.sum() != expected:
            problems[r.request_id] = (int(rows.tokens.sum()), int(expected))
        chain = rows.computed.to_numpy()[1:] - (rows.computed + rows.tokens).to_numpy()[:-1]
        breaks = np.flatnonzero(chain != 0)
        if not set(rows.phase.to_numpy()[1:][breaks]) <= {S.PHASE_RESUMED}:
            problems[r.request_id + ":chain"] = breaks.tolist()
        if rows.computed.iloc[0] != r.cached_prompt_tokens:
            problems[r.request_id + ":first"] = (int(rows.computed.iloc[0]), int(r.cached_prompt_tokens))
    return problems


def block_identity(trace) -> list:
    """Rows where used != previous used + allocated + revived - freed."""
    st = trace["steps"].to_pandas()
    start = trace.end_records["engine_core"]["kv_blocks_used_at_start"]
    prev = np.concatenate([[start], st.kv_blocks_used.to_numpy()[:-1]])
    expected = prev + st.blocks_allocated + st.blocks_revived - st.blocks_freed
    return st.step[expected != st.kv_blocks_used].tolist()


def model_config() -> dict:
    with open(f"{tiny_model_path()}/config.json") as f:
        return json.load(f)


def weights_bytes(cfg: dict, dtype_bytes: int = 2) -> int:
    """Llama parameters: embeddings, per layer attention + MLP + 2 norms, final norm, head."""
    h, inter, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    return dtype_bytes * (v * h + layers * per_layer + h + v * h)


def kv_bytes_per_block(cfg: dict, block_size: int, dtype_bytes: int = 2) -> int:
    return cfg["num_hidden_layers"] * 2 * block_size * cfg["num_key_value_heads"] * cfg["head_dim"] * dtype_bytes
