"""What-if at other batch sizes: the fitted step-time model run through a replay of the
source's workload under a simple model of vLLM's scheduler.

The workload is the source's requests (prompt, prefix-cached and output tokens each),
offered as a closed loop of ``batch_size`` requests in flight (as ``kvprof sweep`` runs it:
a new request enters as soon as one finishes, so none waits in a queue). The schedule
(``simulate``) does not depend on step times, so it is built once per batch size; each
bootstrap draw of the costs then only re-times it (a matrix product), which gives the
interval. Ramp-up and drain are in the schedule, not assumed away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvprof.analysis.step_model import (COEFFICIENTS, TERM_NAMES, Fit, StepSamples,
                                        fit, step_samples)

REFUSE_SPREAD = 0.25   # equally good models disagree by more than this: no number


@dataclass
class Requests:
    """The workload: one entry per finished request."""

    prompt: np.ndarray
    cached: np.ndarray
    output: np.ndarray
    lag: int = 0          # steps between a finish's next step and its replacement's admission


@dataclass
class Source:
    """What a trace gives the model: its fitted steps, its workload, its engine limits."""

    path: str
    batch_size: int                   # the engine's max_num_seqs
    samples: StepSamples
    requests: Requests
    token_budget: int | None
    block_size: int | None
    blocks_total: int | None
    output_tokens_per_s: float        # measured: output tokens / (last update end - first start)
    mean_e2e_ms: float
    mean_tpot_ms: float | None = None
    preemptions: int = 0
    budget_share: float = 0.0         # share of busy steps that used the whole token budget


def source_from_trace(trace) -> Source:
    """Read one trace into a Source (no replay kernel: plain column sums)."""
    steps, rows, reqs = trace["steps"], trace["request_steps"], trace["requests"]
    col = lambda table, name: table.column(name).to_numpy().astype(np.int64)  # noqa: E731
    number, start, end = col(steps, "step"), col(steps, "t_schedule_start_ns"), col(steps, "t_update_end_ns")
    lo = int(number.min()) if number.size else 0
    size = int(number.max()) - lo + 1 if number.size else 0
    step_of_row = col(rows, "step") - lo
    ok = (step_of_row >= 0) & (step_of_row < size)
    context = np.bincount(step_of_row[ok], weights=(col(rows, "computed") + col(rows, "tokens"))[ok],
                          minlength=size)[number - lo] if size else np.zeros(0)
    busy = col(steps, "total_tokens") > 0
    engine, kv = trace.run.get("engine") or {}, trace.run.get("kv") or {}
    running = col(steps, "num_running")
    samples = step_samples(start, busy, col(steps, "num_decode_reqs"), col(steps, "prefill_tokens"),
                           context, int(running.max(initial=0)))
    done = col(reqs, "finish_ns") >= 0
    requests = Requests(col(reqs, "prompt_tokens")[done], col(reqs, "cached_prompt_tokens")[done],
                        col(reqs, "output_tokens")[done],
                        refill_lag(col(reqs, "first_scheduled_step")[done], col(reqs, "finish_step")[done],
                                   int(running.max(initial=0))))
    duration = (end[-1] - start[0]) / 1e9 if start.size else 0.0
    e2e = (col(reqs, "finish_ns") - col(reqs, "arrival_ns"))[done]
    many = done & (col(reqs, "output_tokens") > 1)
    tpot = ((col(reqs, "finish_ns") - col(reqs, "first_token_ns"))[many]
            / (col(reqs, "output_tokens")[many] - 1))
    budget = engine.get("max_num_batched_tokens")
    total = col(steps, "total_tokens")[busy]
    return Source(trace.path, int(engine.get("max_num_seqs") or running.max(initial=0)), samples,
                  requests, engine.get("max_num_batched_tokens"), kv.get("block_size"),
                  kv.get("usable_blocks"), float(requests.output.sum() / duration) if duration else 0.0,
                  float(e2e.mean() / 1e6) if e2e.size else 0.0,
                  float(tpot.mean() / 1e6) if tpot.size else None,
                  int(col(steps, "preemptions").sum()),
                  float((total >= budget).mean()) if budget and total.size else 0.0)


def refill_lag(admitted: np.ndarray, finished: np.ndarray, batch_size: int) -> int:
    """How many steps after the step following a finish its replacement usually got in (the
    most common delay; longer ones wait for the token budget): 0 when requests wait queued,
    1 for a client that adds one while the EngineCore, in its own process, has already
    started the next step. Requests in arrival order (req index)."""
    if batch_size <= 0 or admitted.size <= batch_size:
        return 0
    freed_by = np.sort(finished)[: admitted.size - batch_size]
    late = np.clip(admitted[batch_size:] - freed_by - 1, 0, None)
    return int(np.argmax(np.bincount(late)))


@dataclass
class Schedule:
    """A simulated run. Per step (only when kept): composition. Per request: the steps it
    was admitted, got its first token and finished in, and the clock then under the costs
    simulated with (start of the admitting step, end of the other two). The run's totals."""

    decode: np.ndarray
    prefill: np.ndarray
    context: np.ndarray
    admitted: np.ndarray
    first_token: np.ndarray
    finished: np.ndarray
    totals: np.ndarray        # the design's column sums: steps, decodes, prefill, context tokens
    running_mean: float       # requests in a step
    running_max: int
    start_ns: np.ndarray
    first_token_ns: np.ndarray
    finish_ns: np.ndarray
    time_ns: float


def simulate(requests: Requests, batch_size: int, token_budget: int | None,
             costs: np.ndarray | None = None, keep_steps: bool = True) -> Schedule:
    """vLLM V1's order: running requests first (decodes, then prefill chunks), then admissions
    in arrival order while slots and the token budget last; a prefill's last chunk samples the
    first token. The first ``batch_size`` requests are there at the start; each finish lets
    the next one in ``requests.lag`` steps after the following step (an idle engine waits).
    The loop is the numba kernel ``_kernels.simulate_schedule``: a day's workload is millions
    of simulated steps, so ``predict`` keeps none of them (``keep_steps=False``) and has the
    kernel time them with ``costs`` (ns: per step, decode, prefill token, context token)."""
    from kvprof.analysis._kernels import simulate_schedule

    # tokens of one request fit in int32: a day's requests are not copied to int64
    as_int = lambda a: np.ascontiguousarray(a, np.int32)  # noqa: E731
    costs = np.zeros(len(COEFFICIENTS)) if costs is None else np.asarray(costs, np.float64)
    composition, admitted, first, finished, totals, start, first_ns, finish, clock = \
        simulate_schedule(as_int(requests.prompt), as_int(requests.cached),
                          as_int(requests.output), int(batch_size), int(token_budget or 1 << 30),
                          int(requests.lag), costs, bool(keep_steps))
    decode, prefill, context = composition.T        # views: a day's schedule is long
    steps = int(totals[0])
    return Schedule(decode, prefill, context, admitted, first, finished,
                    totals[:4].astype(np.float64), float(totals[4]) / steps if steps else 0.0,
                    int(totals[5]), start, first_ns, finish, float(clock))


@dataclass
class Prediction:
    batch_size: int
    output_tokens_per_s: float | None
    interval: list[float] | None          # [low, high] of output tokens/s
    step_ms: float | None
    tpot_ms: float | None
    mean_e2e_ms: float | None
    mean_ttft_ms: float | None
    mean_running: float
    extrapolated: bool
    dominant_term: str | None
    term_shares: dict[str, float]
    kv_blocks_needed: int | None
    fits_kv: bool | None
    refused: str | None = None            # why no number is given

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def predict(f: Fit, requests: Requests, batch_size: int, token_budget: int | None = None,
            block_size: int | None = None, blocks_total: int | None = None) -> Prediction:
    """Throughput, step time, TPOT and latency at ``batch_size`` with an interval."""
    best = f.vector
    s = simulate(requests, batch_size, token_budget, best, keep_steps=False)
    draws = f.draws if f.draws is not None else best[None, :]
    tokens = float(np.maximum(requests.output, 1).sum())
    totals = s.totals                       # the run's time is totals @ costs: one sum per draw
    rate = lambda coef: tokens / float(totals @ coef) * 1e9  # noqa: E731
    low, high = np.percentile([rate(c) for c in draws], [2.5, 97.5])
    others = [rate(c) for c in f.alternatives]     # equally good models widen the interval
    low, high = float(min([low, *others])), float(max([high, *others]))
    point = rate(best)
    low, high = min(low, point), max(high, point)
    extrapolated = s.running_max > f.max_running   # more in flight than ever fitted
    refused = None
    unknown = [COEFFICIENTS[j] for j in f.absent() if totals[j] > 0]
    if unknown:
        refused = f"the workload needs {', '.join(unknown)}, which the data never exercised"
    elif f.alternatives and extrapolated and (high - low) / point > REFUSE_SPREAD:
        refused = (f"the data cannot separate {', '.join(f.unseparable)} "
                   f"and the models that fit it equally well disagree here "
                   f"({low:,.0f}–{high:,.0f} tokens/s)")
    shares = totals * best / s.time_ns
    share = dict(zip(COEFFICIENTS, map(float, shares)))
    blocks = kv_blocks_needed(requests, batch_size, block_size)
    latency = _latency(s, requests)
    return Prediction(
        batch_size=batch_size, output_tokens_per_s=None if refused else point,
        interval=[low, high], step_ms=None if refused else s.time_ns / s.totals[0] / 1e6,
        tpot_ms=None if refused else latency[0], mean_e2e_ms=None if refused else latency[1],
        mean_ttft_ms=None if refused else latency[2],
        mean_running=s.running_mean,
        extrapolated=extrapolated,
        dominant_term=TERM_NAMES[int(np.argmax(shares))] if not refused else None,
        term_shares=share, kv_blocks_needed=blocks,
        fits_kv=blocks <= blocks_total if blocks is not None and blocks_total else None,
        refused=refused)


def _latency(s: Schedule, requests: Requests) -> tuple[float, float, float]:
    """(mean TPOT, mean end-to-end, mean TTFT) in ms: a request's time runs from the start of
    the step that admitted it to the end of the step that produced the token."""
    e2e = s.finish_ns - s.start_ns
    ttft = s.first_token_ns - s.start_ns
    many = requests.output > 1
    tpot = (s.finish_ns - s.first_token_ns)[many] / (requests.output[many] - 1)
    return (float(tpot.mean() / 1e6) if tpot.size else math.nan, float(e2e.mean() / 1e6),
            float(ttft.mean() / 1e6))


def kv_blocks_needed(requests: Requests, batch_size: int, block_size: int | None) -> int | None:
    """KV blocks for ``batch_size`` requests of mean length at their full length."""
    if not block_size or not len(requests.prompt):
        return None
    per_request = math.ceil(float((requests.prompt + requests.output).mean()) / block_size)
    return int(batch_size * per_request)


@dataclass
class StepModel:
    """The fitted model of one trace (or many), its predictions, and a check at the batch
    size the trace ran (the model's throughput there against the measured one)."""

    fit: Fit
    predictions: list[Prediction]
    check: dict | None = None

    def to_dict(self) -> dict:
        return {**self.fit.to_dict(), "predictions": [p.to_dict() for p in self.predictions],
                "check": self.check}


def step_model(samples: StepSamples, requests: Requests, limits: dict, predict_at: tuple = (),
               observed: tuple[int, float] | None = None) -> StepModel:
    """Fit on ``samples``; predict at ``predict_at`` for ``requests``; ``observed`` =
    (batch size run, measured output tokens/s). ``limits``: token_budget, block_size,
    blocks_total (any may be None)."""
    return fitted_model(fit(samples), requests, limits, predict_at, observed)


def fitted_model(f: Fit, requests: Requests, limits: dict, predict_at: tuple = (),
                 observed: tuple[int, float] | None = None) -> StepModel:
    """``step_model`` from a fit already made (its samples may be gone: a day's steps)."""
    if f.coefficients is None or not len(requests.prompt):
        return StepModel(f, [])
    run = lambda b: predict(f, requests, b, **limits)  # noqa: E731
    check = None
    if observed is not None and observed[0] > 0:
        at = run(observed[0])
        check = {"batch_size": observed[0], "predicted_output_tokens_per_s": at.output_tokens_per_s,
                 "interval": at.interval, "measured_output_tokens_per_s": observed[1]}
    return StepModel(f, [run(b) for b in predict_at], check)
