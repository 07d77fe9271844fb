"""numba kernels on plain NumPy arrays: the only place kvprof compiles code.

Kept apart from the pure analyses so that importing an analysis module never
pays for numba, and so that ``NUMBA_DISABLE_JIT=1`` runs the very same Python.
The kernel is one forward pass, called once per Arrow record batch with state
carried between calls: no sort and no concatenation of request-step rows.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kvprof.format.schema import PHASE_DECODE

# Columns of the per-step output (shape (steps, 4)).
STEP_CONTEXT, STEP_EMITTED, STEP_RECOMPUTED, STEP_NEXT_GAPS = range(4)
# Columns of the per-request state (shape (requests, 4): one cache line per request).
REQ_EMITTED, REQ_LAST_POS, REQ_HIGH_WATER, REQ_SEEN = range(4)
# Entries of the scalar totals (shape (3,)).
TOTAL_OTHER_GAPS, TOTAL_DECODE_CONTEXT, TOTAL_DECODE_ROWS = range(3)


def new_state(n_steps: int, n_req: int, other_capacity: int):
    """Zeroed (per-step, per-request, other gaps, totals) arrays for ``replay_batch``."""
    return np.zeros((n_steps, 4), np.int64), new_requests(n_req), \
        np.empty(max(other_capacity, 1), np.int64), np.zeros(3, np.int64)


def new_requests(n_req: int) -> np.ndarray:
    """Per-request state of ``n_req`` requests not seen yet."""
    per_req = np.zeros((n_req, 4), np.int64)
    per_req[:, REQ_LAST_POS] = -1
    return per_req


@njit(cache=True, nogil=True)
def replay_batch(step, req, phase, tokens, computed, start, step_min, step_pos, in_window,
                 step_end_ns, prompt, delivered, latency_req, per_step, per_req, other_gaps, totals):
    """Replay rows ``start``.. of one batch of request_steps (in step order), updating the
    state in place; returns the row it stopped at: the batch's length, or earlier when
    ``other_gaps`` is full (the caller grows it and calls again from there).

    A row samples a token iff computed + tokens >= prompt + tokens its request sampled
    so far (a request of unknown prompt length, -1, samples on decode rows). Tokens
    are emitted at their step's ``step_end_ns``. Inter-token gaps are kept for the
    requests flagged in ``latency_req``: a gap between adjacent steps s-1 and s is only
    counted (``per_step[s, STEP_NEXT_GAPS]``; its value is end[s] - end[s-1]), any other
    gap value is appended to ``other_gaps``; ITL stays exact without one value per token.
    Tokens recomputed after a preemption: the part of a row below its request's
    high-water mark of computed tokens. A request samples at most ``delivered[r]``
    tokens (its output_tokens once finished): vLLM discards the token of a request
    aborted while its last step ran.
    """
    n_req = prompt.shape[0]
    n_lookup = step_pos.shape[0]
    n_other = totals[TOTAL_OTHER_GAPS]
    for i in range(start, step.shape[0]):
        if n_other == other_gaps.shape[0]:
            totals[TOTAL_OTHER_GAPS] = n_other
            return i
        k = step[i] - step_min
        if k < 0 or k >= n_lookup:
            continue
        s = step_pos[k]
        r = req[i]
        if s < 0 or r < 0 or r >= n_req:
            continue
        done = np.int64(computed[i])
        ctx = done + tokens[i]
        high = per_req[r, REQ_HIGH_WATER]
        redo = min(ctx, high) - done
        if ctx > high:
            per_req[r, REQ_HIGH_WATER] = ctx
        emitted = per_req[r, REQ_EMITTED]
        if prompt[r] >= 0:
            samples = ctx >= prompt[r] + emitted
        else:
            samples = phase[i] == PHASE_DECODE
        samples = samples and emitted < delivered[r]
        if in_window[s]:
            per_step[s, STEP_CONTEXT] += ctx
            per_req[r, REQ_SEEN] = 1
            if redo > 0:
                per_step[s, STEP_RECOMPUTED] += redo
            if phase[i] == PHASE_DECODE:
                totals[TOTAL_DECODE_CONTEXT] += ctx
                totals[TOTAL_DECODE_ROWS] += 1
            if samples:
                per_step[s, STEP_EMITTED] += 1
        if not samples:
            continue
        last = per_req[r, REQ_LAST_POS]
        if latency_req[r] and last >= 0:
            if last == s - 1:
                per_step[s, STEP_NEXT_GAPS] += 1
            else:
                other_gaps[n_other] = step_end_ns[s] - step_end_ns[last]
                n_other += 1
        per_req[r, REQ_EMITTED] = emitted + 1
        per_req[r, REQ_LAST_POS] = s
    totals[TOTAL_OTHER_GAPS] = n_other
    return step.shape[0]
