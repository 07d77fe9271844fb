"""``predict.simulate`` (a numba kernel) against the plain-Python scheduler replay it replaced.

The reference below is the loop as it was written before it was compiled, kept here
verbatim: the kernel must give the very same schedule, step for step, on workloads that
exercise chunked prefill, full prefix hits, an idle engine waiting for its refill lag,
and batches larger than the workload.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvprof.analysis.predict import Requests, simulate


def reference_simulate(requests: Requests, batch_size: int, token_budget: int | None):
    """vLLM V1's order: running requests first (decodes, then prefill chunks), then admissions
    in arrival order while slots and the token budget last; a prefill's last chunk samples the
    first token. The first ``batch_size`` requests are there at the start; each finish lets
    the next one in ``requests.lag`` steps after the following step (an idle engine waits)."""
    budget_max = token_budget or 1 << 30
    n = len(requests.prompt)
    # a full prefix hit still recomputes the prompt's last token
    computed = np.minimum(requests.cached, requests.prompt - 1).clip(0).astype(np.int64)
    emitted = np.zeros(n, np.int64)
    admitted, first, finished = (np.full(n, -1, np.int64) for _ in range(3))
    ready = np.full(n, np.iinfo(np.int64).max)
    ready[:batch_size] = 0
    released = min(batch_size, n)
    running: list[int] = []
    nxt = 0
    composition = []
    while nxt < n or running:
        step = len(composition)
        if not running and ready[nxt] > step:
            ready[nxt] = step                    # nothing to run: the engine waits for it
        budget, decode, prefill, context = budget_max, 0, 0, 0
        for r in running + list(range(nxt, min(n, nxt + batch_size - len(running)))):
            if budget <= 0 or ready[r] > step:
                break
            if admitted[r] < 0:
                admitted[r], nxt = step, nxt + 1
                running.append(r)
            left = requests.prompt[r] - computed[r] if emitted[r] == 0 else 0
            tokens = min(left, budget) if left > 0 else 1
            budget -= tokens
            prefill, decode = (prefill + tokens, decode) if left > 0 else (prefill, decode + 1)
            context += computed[r] + tokens
            computed[r] += tokens
            if tokens >= left:   # a decode, or the prefill's last chunk: one token out
                emitted[r] += 1
                first[r] = step if first[r] < 0 else first[r]
                if emitted[r] >= max(requests.output[r], 1):
                    finished[r] = step
                    if released < n:
                        ready[released], released = step + 1 + requests.lag, released + 1
        running = [r for r in running if finished[r] < 0]
        composition.append((decode, prefill, context))
    decode_a, prefill_a, context_a = np.asarray(composition, np.float64).reshape(-1, 3).T
    return decode_a, prefill_a, context_a, admitted, first, finished


def workload(seed: int, n: int, lag: int) -> Requests:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 3000, n)
    cached = np.where(rng.random(n) < 0.3, prompt - rng.integers(0, 3, n), 0).clip(0)
    return Requests(prompt, cached, rng.integers(0, 80, n), lag)


@pytest.mark.parametrize("seed,n,batch_size,budget,lag", [
    (0, 60, 8, 512, 0), (1, 60, 1, 2048, 1), (2, 40, 64, 256, 0), (3, 80, 16, None, 2),
    (4, 5, 32, 128, 3), (5, 120, 12, 1000, 1)])
def test_the_kernel_schedules_as_the_python_loop_did(seed, n, batch_size, budget, lag):
    requests = workload(seed, n, lag)
    got = simulate(requests, batch_size, budget)
    want = reference_simulate(requests, batch_size, budget)
    for name, mine, theirs in zip(("decode", "prefill", "context", "admitted", "first_token",
                                   "finished"), (got.decode, got.prefill, got.context, got.admitted,
                                                 got.first_token, got.finished), want):
        assert np.array_equal(mine, theirs), name
    assert (got.finished >= got.first_token).all() and (got.first_token >= got.admitted).all()


def test_an_empty_workload_has_no_steps():
    s = simulate(Requests(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)), 4, 64)
    assert s.decode.size == 0 and s.admitted.size == 0


@pytest.mark.parametrize("seed,n,batch_size,budget,lag", [(0, 60, 8, 512, 0), (3, 80, 16, None, 2),
                                                          (1, 30, 1, 2048, 1)])
def test_the_timed_run_keeps_nothing_per_step_and_agrees_with_the_kept_steps(seed, n, batch_size,
                                                                             budget, lag):
    """``predict`` times the run in the kernel without the per-step arrays: its totals, its
    requests in flight and each request's clock must be what the kept steps give."""
    requests = workload(seed, n, lag)
    costs = np.array([2e6, 3e4, 1.5e3, 7.0])
    kept = simulate(requests, batch_size, budget)
    timed = simulate(requests, batch_size, budget, costs, keep_steps=False)
    assert timed.decode.size == 0
    assert np.array_equal(timed.finished, kept.finished)
    design = [np.ones(kept.decode.size), kept.decode, kept.prefill, kept.context]
    assert timed.totals.tolist() == [float(column.sum()) for column in design]
    end = np.cumsum(sum(c * column for c, column in zip(costs, design)))
    np.testing.assert_allclose(timed.finish_ns, end[kept.finished], rtol=1e-12)
    np.testing.assert_allclose(timed.first_token_ns, end[kept.first_token], rtol=1e-12)
    start = np.concatenate([[0.0], end])[kept.admitted]
    np.testing.assert_allclose(timed.start_ns, start, rtol=1e-12, atol=1e-3)
    assert timed.time_ns == pytest.approx(end[-1], rel=1e-12)
    steps = np.arange(kept.decode.size)[:, None]
    in_flight = ((kept.admitted <= steps) & (steps <= kept.finished)).sum(axis=1)
    assert timed.running_max == in_flight.max()
    assert timed.running_mean == pytest.approx(in_flight.mean(), rel=1e-12)
