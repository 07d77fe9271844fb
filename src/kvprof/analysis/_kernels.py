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

# The per-step outputs, one array each (so that the results need no copy): context tokens,
# tokens emitted, adjacent inter-token gaps ending at the step.
STEP_DTYPES = (np.int64, np.int32, np.int32)
# Columns of the per-request state (shape (requests, 4): one cache line per request).
REQ_EMITTED, REQ_LAST_POS, REQ_HIGH_WATER, REQ_SEEN = range(4)
# Entries of the scalar totals (shape (4,)); the recomputed tokens are only ever summed over
# the selected steps, so they are a total, not 8 bytes a step.
TOTAL_OTHER_GAPS, TOTAL_DECODE_CONTEXT, TOTAL_DECODE_ROWS, TOTAL_RECOMPUTED = range(4)


def new_state(n_steps: int, n_req: int, other_capacity: int):
    """Zeroed (per-step arrays, per-request, other gaps, totals) for ``replay_batch``."""
    return tuple(np.zeros(n_steps, dtype) for dtype in STEP_DTYPES), new_requests(n_req), \
        np.empty(max(other_capacity, 1), np.int64), np.zeros(4, np.int64)


def new_requests(n_req: int) -> np.ndarray:
    """Per-request state of ``n_req`` requests not seen yet."""
    per_req = np.zeros((n_req, 4), np.int64)
    per_req[:, REQ_LAST_POS] = -1
    return per_req


@njit(cache=True, nogil=True)
def replay_batch(step, req, phase, tokens, computed, start, step_min, step_pos, in_window,
                 step_end_ns, prompt, delivered, latency_req, step_context, step_emitted,
                 step_next_gaps, per_req, other_gaps, totals):
    """Replay rows ``start``.. of one batch of request_steps (in step order), updating the
    state in place; returns the row it stopped at: the batch's length, or earlier when
    ``other_gaps`` is full (the caller grows it and calls again from there).

    A row samples a token iff computed + tokens >= prompt + tokens its request sampled
    so far (a request of unknown prompt length, -1, samples on decode rows). Tokens
    are emitted at their step's ``step_end_ns``. Inter-token gaps are kept for the
    requests flagged in ``latency_req``: a gap between adjacent steps s-1 and s is only
    counted (``step_next_gaps[s]``; its value is end[s] - end[s-1]), any other
    gap value is appended to ``other_gaps``; ITL stays exact without one value per token.
    Tokens recomputed after a preemption: the part of a row below its request's
    high-water mark of computed tokens. A request samples at most ``delivered[r]``
    tokens (its output_tokens once finished): vLLM discards the token of a request
    aborted while its last step ran.
    """
    n_req = prompt.shape[0]
    dense = step_pos.shape[0] == 0          # steps numbered without a gap: no lookup table
    n_lookup = step_context.shape[0] if dense else step_pos.shape[0]
    n_other = totals[TOTAL_OTHER_GAPS]
    for i in range(start, step.shape[0]):
        if n_other == other_gaps.shape[0]:
            totals[TOTAL_OTHER_GAPS] = n_other
            return i
        k = step[i] - step_min
        if k < 0 or k >= n_lookup:
            continue
        s = k if dense else step_pos[k]
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
            step_context[s] += ctx
            per_req[r, REQ_SEEN] = 1
            if redo > 0:
                totals[TOTAL_RECOMPUTED] += redo
            if phase[i] == PHASE_DECODE:
                totals[TOTAL_DECODE_CONTEXT] += ctx
                totals[TOTAL_DECODE_ROWS] += 1
            if samples:
                step_emitted[s] += 1
        if not samples:
            continue
        last = per_req[r, REQ_LAST_POS]
        if latency_req[r] and last >= 0:
            if last == s - 1:
                step_next_gaps[s] += 1
            else:
                other_gaps[n_other] = step_end_ns[s] - step_end_ns[last]
                n_other += 1
        per_req[r, REQ_EMITTED] = emitted + 1
        per_req[r, REQ_LAST_POS] = s
    totals[TOTAL_OTHER_GAPS] = n_other
    return step.shape[0]


@njit(cache=True, nogil=True)
def simulate_schedule(prompt, cached, output, batch_size, budget_max, lag, coef, keep_steps):
    """The scheduler replay of ``predict.simulate`` (see there for the rules), compiled: it
    runs once per step of the simulated run, with up to ``batch_size`` requests each.
    Each step's time is ``coef`` · (1, decodes, prefill tokens, context tokens), summed as
    it goes, so nothing per step need be kept: a day's schedule at batch size 1 is as many
    steps as output tokens.

    Returns (composition: steps x 3 of decode requests, prefill tokens, context tokens,
    empty unless ``keep_steps``; admitted, first_token, finished: the step of each
    request's event; totals: steps, decodes, prefill tokens, context tokens, the sum and the
    maximum of requests in a step; the clock (ns) at the start of each request's admitting
    step, at the end of its first token's step and of its finishing step; the run's time)."""
    n = prompt.shape[0]
    computed = np.empty(n, np.int64)
    for r in range(n):
        computed[r] = max(min(cached[r], prompt[r] - 1), 0)   # a full hit recomputes one token
    emitted = np.zeros(n, np.int64)
    admitted = np.full(n, -1, np.int64)
    first = np.full(n, -1, np.int64)
    finished = np.full(n, -1, np.int64)
    start_ns = np.zeros(n)
    first_ns = np.zeros(n)
    finish_ns = np.zeros(n)
    ready = np.full(n, np.iinfo(np.int64).max, np.int64)
    ready[:batch_size] = 0
    released = min(batch_size, n)
    running = np.empty(max(batch_size, 1), np.int64)
    n_run = 0
    nxt = 0
    composition = np.empty((max(n, 16) if keep_steps else 0, 3), np.int64)
    totals = np.zeros(6, np.int64)
    clock = 0.0
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
                start_ns[r] = clock
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
        clock += coef[0] + decode * coef[1] + prefill * coef[2] + context * coef[3]
        totals[1] += decode
        totals[2] += prefill
        totals[3] += context
        totals[4] += n_run
        totals[5] = max(totals[5], n_run)
        kept = 0
        for i in range(n_run):
            r = running[i]
            if first[r] == step:
                first_ns[r] = clock
            if finished[r] < 0:
                running[kept] = r
                kept += 1
            else:
                finish_ns[r] = clock
        n_run = kept
        if keep_steps:
            if step == composition.shape[0]:
                grown = np.empty((2 * step, 3), np.int64)
                grown[:step] = composition
                composition = grown
            composition[step, 0] = decode
            composition[step, 1] = prefill
            composition[step, 2] = context
        step += 1
    totals[0] = step
    return (composition[:step], admitted, first, finished, totals, start_ns, first_ns, finish_ns,
            clock)


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
