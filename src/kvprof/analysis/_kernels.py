"""numba kernels on plain NumPy arrays: the only place kvprof compiles code.

Kept apart from the pure analyses so that importing an analysis module never
pays for numba, and so that ``NUMBA_DISABLE_JIT=1`` runs the very same Python.
Every kernel is a single forward pass: no sort over request-step rows.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kvprof.format.schema import PHASE_DECODE

# Positions of the per-step outputs in the tuple ``replay_request_steps`` returns.
STEP_CONTEXT, STEP_EMITTED, STEP_RECOMPUTED, STEP_NEXT_GAPS = range(4)


@njit(cache=True, nogil=True)
def replay_request_steps(step, req, phase, tokens, computed, step_min, step_pos, in_window,
                         step_end_ns, prompt, latency_req):
    """Replay request_steps in step order with per-request state indexed by ``req``.

    A row samples a token iff computed + tokens >= prompt + tokens sampled so far by
    its request (a request of unknown prompt length samples on decode rows). Tokens
    are emitted at their step's ``step_end_ns``; inter-token gaps are kept for the
    requests flagged in ``latency_req``. A gap between adjacent steps s-1 and s is
    only counted (in ``next_gaps[s]``: its value is end[s] - end[s-1]); any other
    gap value goes to ``other_gaps``. That keeps ITL exact without storing one
    value per token.

    Returns (per-step int64 arrays: context tokens, tokens emitted, tokens
    recomputed after a preemption, adjacent-step gap counts), other gaps (ns),
    per-request (tokens emitted, seen in window), and in-window decode-row
    (context sum, row count).
    """
    n_steps = in_window.shape[0]
    n_req = prompt.shape[0]
    n_lookup = step_pos.shape[0]
    context = np.zeros(n_steps, np.int64)
    emitted_at = np.zeros(n_steps, np.int64)
    recomputed = np.zeros(n_steps, np.int64)
    next_gaps = np.zeros(n_steps, np.int64)
    other_gaps = np.empty(max(step.shape[0], 1), np.int64)
    n_other = 0
    emitted = np.zeros(n_req, np.int32)
    last_pos = np.full(n_req, -1, np.int64)
    high_water = np.zeros(n_req, np.int64)
    seen = np.zeros(n_req, np.uint8)
    decode_context = 0
    decode_rows = 0
    for i in range(step.shape[0]):
        k = step[i] - step_min
        if k < 0 or k >= n_lookup:
            continue
        s = step_pos[k]
        r = req[i]
        if s < 0 or r < 0 or r >= n_req:
            continue
        done = np.int64(computed[i])
        ctx = done + tokens[i]
        redo = min(ctx, high_water[r]) - done
        if ctx > high_water[r]:
            high_water[r] = ctx
        if prompt[r] >= 0:
            samples = ctx >= prompt[r] + emitted[r]
        else:
            samples = phase[i] == PHASE_DECODE
        if in_window[s]:
            context[s] += ctx
            seen[r] = 1
            if redo > 0:
                recomputed[s] += redo
            if phase[i] == PHASE_DECODE:
                decode_context += ctx
                decode_rows += 1
        if not samples:
            continue
        if in_window[s]:
            emitted_at[s] += 1
        last = last_pos[r]
        if latency_req[r] and last >= 0:
            if last == s - 1:
                next_gaps[s] += 1
            else:
                other_gaps[n_other] = step_end_ns[s] - step_end_ns[last]
                n_other += 1
        emitted[r] += 1
        last_pos[r] = s
    return ((context, emitted_at, recomputed, next_gaps), other_gaps[:n_other], emitted, seen,
            decode_context, decode_rows)
