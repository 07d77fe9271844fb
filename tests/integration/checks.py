"""Independent checks of a trace's invariants, shared by the tracer tests.

Written with pandas, apart from kvprof's own analysis code, so that an error in
one is not silently repeated in the other.
"""
from __future__ import annotations

import numpy as np

from kvprof.format import schema as S


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
