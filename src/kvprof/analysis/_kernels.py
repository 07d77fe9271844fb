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


@njit(cache=True, nogil=True)
def simulate_schedule(prompt, cached, output, batch_size, budget_max, lag):
    """The scheduler replay of ``predict.simulate`` (see there for the rules), compiled: it
    runs once per step of the simulated run, with up to ``batch_size`` requests each.

    Returns (composition: steps x 3 of decode requests, prefill tokens, context tokens;
    admitted, first_token, finished: the step of each request's event)."""
    n = prompt.shape[0]
    computed = np.empty(n, np.int64)
    for r in range(n):
        computed[r] = max(min(cached[r], prompt[r] - 1), 0)   # a full hit recomputes one token
    emitted = np.zeros(n, np.int64)
    admitted = np.full(n, -1, np.int64)
    first = np.full(n, -1, np.int64)
    finished = np.full(n, -1, np.int64)
    ready = np.full(n, np.iinfo(np.int64).max, np.int64)
    ready[:batch_size] = 0
    released = min(batch_size, n)
    running = np.empty(max(batch_size, 1), np.int64)
    n_run = 0
    nxt = 0
    composition = np.empty((max(n, 16), 3), np.int64)
    step = 0
    while nxt < n or n_run > 0:
        if n_run == 0 and ready[nxt] > step:
            ready[nxt] = step                        # nothing to run: the engine waits for it
        budget, decode, prefill, context = budget_max, 0, 0, 0
        n_old, first_new = n_run, nxt
        candidates = n_old + min(n, nxt + batch_size - n_old) - nxt
        for c in range(candidates):
            r = running[c] if c < n_old else first_new + (c - n_old)
            if budget <= 0 or ready[r] > step:
                break
            if admitted[r] < 0:
                admitted[r] = step
                nxt += 1
                running[n_run] = r
                n_run += 1
            left = prompt[r] - computed[r] if emitted[r] == 0 else 0
            tokens = min(left, budget) if left > 0 else 1
            budget -= tokens
            if left > 0:
                prefill += tokens
            else:
                decode += 1
            context += computed[r] + tokens
            computed[r] += tokens
            if tokens >= left:                       # a decode, or a prefill's last chunk
                emitted[r] += 1
                if first[r] < 0:
                    first[r] = step
                if emitted[r] >= max(output[r], 1):
                    finished[r] = step
                    if released < n:
                        ready[released] = step + 1 + lag
                        released += 1
        kept = 0
        for i in range(n_run):
            if finished[running[i]] < 0:
                running[kept] = running[i]
                kept += 1
        n_run = kept
        if step == composition.shape[0]:
            grown = np.empty((2 * step, 3), np.int64)
            grown[:step] = composition
            composition = grown
        composition[step, 0] = decode
        composition[step, 1] = prefill
        composition[step, 2] = context
        step += 1
    return composition[:step], admitted, first, finished


@njit(cache=True, nogil=True)
def block_sums(prefix, starts, block):
    """For each row d of ``starts`` (a bootstrap draw of block starts), the sum over its
    blocks of ``prefix[start + block] - prefix[start]``: the draw's sums of each column of
    ``prefix``'s underlying per-step values, in one pass without temporaries."""
    draws, blocks = starts.shape
    width = prefix.shape[1]
    out = np.zeros((draws, width))
    for d in range(draws):
        for i in range(blocks):
            s = starts[d, i]
            for c in range(width):
                out[d, c] += prefix[s + block, c] - prefix[s, c]
    return out
