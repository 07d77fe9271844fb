"""A linear model of step time from step composition, and what it predicts at other batch sizes.

step_ns = fixed + per_decode_request * decode requests + per_prefill_token * prefill tokens
          + per_context_token * context tokens (sum of computed + scheduled over the step's requests)

Fitted by least squares on the steps that scheduled tokens. The prediction at batch
size B assumes a steady state in which every request lives for O steps (one prefill
of P - H new tokens, O - 1 decodes), so B / O requests are admitted per step; see
docs/analyses.md for the formula and its limits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

COEFFICIENTS = ("fixed_ns", "per_decode_request_ns", "per_prefill_token_ns", "per_context_token_ns")
MIN_STEPS = 5


@dataclass
class Fit:
    coefficients: dict[str, float] | None
    r2: float | None
    rmse_ms: float | None
    rank: int
    steps: int


@dataclass
class Workload:
    """The request shape the prediction assumes, measured in the selection."""

    mean_prompt_tokens: float
    mean_cached_prompt_tokens: float
    mean_output_tokens: float
    mean_decode_context_tokens: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Prediction:
    batch_size: float
    step_ms: float
    output_tokens_per_s: float
    decode_requests_per_step: float
    prefill_tokens_per_step: float
    context_tokens_per_step: float
    kv_blocks_needed: int | None     # every request at its full length
    fits_kv: bool | None
    fits_token_budget: bool | None
    extrapolated: bool               # beyond the largest batch seen in the trace

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StepModel:
    fit: Fit
    workload: Workload
    predictions: list[Prediction] = field(default_factory=list)
    check: dict | None = None        # the model at the trace's own mean batch vs what was measured

    def to_dict(self) -> dict:
        return {"coefficients": self.fit.coefficients, "r2": self.fit.r2,
                "rmse_ms": self.fit.rmse_ms, "rank": self.fit.rank, "steps": self.fit.steps,
                "workload": self.workload.to_dict(),
                "predictions": [p.to_dict() for p in self.predictions], "check": self.check}


def design_matrix(decode_reqs, prefill_tokens, context_tokens) -> np.ndarray:
    ones = np.ones(len(decode_reqs))
    return np.column_stack([ones, decode_reqs, prefill_tokens, context_tokens]).astype(np.float64)


def fit(step_ns: np.ndarray, decode_reqs: np.ndarray, prefill_tokens: np.ndarray,
        context_tokens: np.ndarray) -> Fit:
    """Least squares with columns scaled to [0, 1] (conditioning), coefficients in ns."""
    x = design_matrix(decode_reqs, prefill_tokens, context_tokens)
    y = np.asarray(step_ns, np.float64)
    if len(y) < MIN_STEPS or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return Fit(None, None, None, 0, len(y))
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    try:
        solution, _, rank, _ = np.linalg.lstsq(x / scale, y, rcond=None)
    except np.linalg.LinAlgError:   # only on absurd inputs (a corrupt trace): no model
        return Fit(None, None, None, 0, len(y))
    coef = solution / scale
    residual = y - x @ coef
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    rmse_ms = float(np.sqrt((residual ** 2).mean()) / 1e6)
    return Fit(dict(zip(COEFFICIENTS, map(float, coef))), r2, rmse_ms, int(rank), len(y))


def steady_state(batch_size: float, w: Workload) -> tuple[float, float, float]:
    """(decode requests, prefill tokens, context tokens) of one step at ``batch_size``."""
    admitted = batch_size / max(w.mean_output_tokens, 1.0)
    decode = batch_size - admitted
    prefill = admitted * max(w.mean_prompt_tokens - w.mean_cached_prompt_tokens, 0.0)
    context = decode * w.mean_decode_context_tokens + admitted * w.mean_prompt_tokens
    return decode, prefill, context


def predict(f: Fit, batch_size: float, w: Workload, limits: dict) -> Prediction | None:
    """Step time and output throughput at ``batch_size``; None without a fit.

    ``limits``: blocks_total, block_size, max_num_batched_tokens, max_running (any may be None)."""
    if f.coefficients is None:
        return None
    decode, prefill, context = steady_state(batch_size, w)
    a, b, c, d = (f.coefficients[name] for name in COEFFICIENTS)
    step_ns = a + b * decode + c * prefill + d * context
    blocks = _blocks_needed(batch_size, w, limits.get("block_size"))
    total, budget = limits.get("blocks_total"), limits.get("max_num_batched_tokens")
    return Prediction(
        batch_size=batch_size, step_ms=step_ns / 1e6,
        output_tokens_per_s=batch_size / step_ns * 1e9 if step_ns > 0 else math.inf,
        decode_requests_per_step=decode, prefill_tokens_per_step=prefill,
        context_tokens_per_step=context, kv_blocks_needed=blocks,
        fits_kv=blocks <= total if blocks is not None and total else None,
        fits_token_budget=decode + prefill <= budget if budget else None,
        extrapolated=batch_size > (limits.get("max_running") or 0))


def _blocks_needed(batch_size: float, w: Workload, block_size: int | None) -> int | None:
    if not block_size:
        return None
    per_request = math.ceil((w.mean_prompt_tokens + w.mean_output_tokens) / block_size)
    return int(math.ceil(batch_size) * per_request)


def step_model(step_ns, decode_reqs, prefill_tokens, context_tokens, workload: Workload,
               predict_at: tuple = (), limits: dict | None = None,
               observed: tuple[float, float] | None = None) -> StepModel:
    """Fit, predict at ``predict_at``, and check the model at ``observed`` =
    (mean running, measured output tokens/s)."""
    limits = limits or {}
    f = fit(step_ns, decode_reqs, prefill_tokens, context_tokens)
    predictions = [p for p in (predict(f, b, workload, limits) for b in predict_at) if p]
    check = None
    if observed is not None and f.coefficients is not None and observed[0] > 0:
        at = predict(f, observed[0], workload, limits)
        check = {"batch_size": observed[0], "predicted_output_tokens_per_s": at.output_tokens_per_s,
                 "measured_output_tokens_per_s": observed[1]}
    return StepModel(f, workload, predictions, check)
