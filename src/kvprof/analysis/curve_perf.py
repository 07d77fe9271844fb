"""Throughput and latency columns of a published batch-size table, explained per added
sequence (``kvprof curve --output-tokens N`` on a CSV with those columns).

With O output tokens per request, time per output token TPOT ≈ mean latency / O (the
prefill is small against O decode steps). In decode every running sequence gets one
token per step, so TPOT is the step time, and output tokens/s = sequences running / TPOT.
Two things follow from the table alone:

- the **step time per added sequence**, ΔTPOT / Δbatch between rows: if it rises above
  a batch size, each step gets slower per sequence (the device saturating); if it stays
  flat, the step time does not bend;
- the **implied running sequences**, throughput × TPOT: when it falls short of the batch
  size, the throughput column counts time in which the batch was not full (ramp-up,
  drain, a client that did not keep it full): throughput then bends without the device
  saturating.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvprof.analysis.step_model import nnls

RISE = 1.5      # a per-sequence slope this many times the earlier ones' is "rising"


@dataclass
class PerfRow:
    batch_size: int
    output_tokens_per_s: float | None
    latency_ms: float | None
    tpot_ms: float | None
    implied_running: float | None       # throughput x TPOT
    gain_per_added_sequence: float | None      # tokens/s, from the previous row
    tpot_per_added_sequence_ms: float | None   # from the previous row


def _mean_by_size(sizes: list[int], values: list[float | None]) -> dict[int, float | None]:
    out: dict[int, list[float]] = {}
    for b, v in zip(sizes, values):
        out.setdefault(b, [])
        if v is not None:
            out[b].append(v)
    return {b: (float(np.mean(v)) if v else None) for b, v in sorted(out.items())}


def explain_performance(batch_sizes: list[int], throughput: list[float | None],
                        latency_ms: list[float | None], output_tokens: int | None) -> dict:
    """Rows, a fit of TPOT = fixed + per_sequence x batch, and the explanation."""
    tps = _mean_by_size(batch_sizes, throughput)
    lat = _mean_by_size(batch_sizes, latency_ms)
    rows, previous = [], None
    for b in tps:
        tpot = lat[b] / output_tokens if lat[b] is not None and output_tokens else None
        row = PerfRow(b, tps[b], lat[b], tpot,
                      tps[b] * tpot / 1e3 if tps[b] is not None and tpot is not None else None,
                      _per(previous, b, tps[b], "output_tokens_per_s"),
                      _per(previous, b, tpot, "tpot_ms"))
        rows.append(row)
        previous = row
    fit = _fit(rows)
    return {"output_tokens": output_tokens, "rows": [r.__dict__ for r in rows], "fit": fit,
            "explanation": explanation(rows, fit, output_tokens)}


def _per(previous: PerfRow | None, b: int, value: float | None, attr: str) -> float | None:
    before = getattr(previous, attr) if previous else None
    if before is None or value is None:
        return None
    return (value - before) / (b - previous.batch_size)


def _fit(rows: list[PerfRow]) -> dict | None:
    """TPOT = fixed + per_sequence x batch size (non-negative least squares)."""
    points = [(r.batch_size, r.tpot_ms) for r in rows if r.tpot_ms is not None]
    if len(points) < 3:
        return None
    b, t = np.array(points, np.float64).T
    fixed, per_seq = nnls(np.column_stack([np.ones_like(b), b]), t)
    return {"fixed_ms": float(fixed), "per_sequence_ms": float(per_seq),
            "half_saturation_batch": float(fixed / per_seq) if per_seq > 0 else None,
            "ceiling_output_tokens_per_s": float(1e3 / per_seq) if per_seq > 0 else None}


def explanation(rows: list[PerfRow], fit: dict | None, output_tokens: int | None) -> list[str]:
    lines = []
    gains = [r for r in rows if r.gain_per_added_sequence is not None]
    if gains:
        lines.append("Output tokens/s per added sequence between rows: " + ", ".join(
            f"{r.batch_size}: {r.gain_per_added_sequence:+,.1f}" for r in gains) + ".")
    if not output_tokens:
        if any(r.latency_ms is not None for r in rows):
            lines.append("Give --output-tokens N (output tokens per request) to turn latency "
                         "into time per output token and explain the bend.")
        return lines
    slopes = [r for r in rows if r.tpot_per_added_sequence_ms is not None]
    if slopes:
        lines.append("Time per output token (latency / " f"{output_tokens}) per added sequence: "
                     + ", ".join(f"{r.batch_size}: {r.tpot_per_added_sequence_ms:+.3f} ms"
                                 for r in slopes) + ".")
        lines.append(_bend(slopes))
    full = [r for r in rows if r.implied_running is not None]
    short = [r for r in full if r.implied_running < 0.8 * r.batch_size]
    if short:
        lines.append(
            "Throughput x TPOT gives the sequences that were running on average: "
            + ", ".join(f"{r.batch_size}: {r.implied_running:.1f}" for r in full)
            + f". From batch size {short[0].batch_size} on, fewer ran than the batch allowed, so "
              "the throughput column counts time the batch was not full (ramp-up, drain, a "
              "client that did not keep it full, or time outside decode): its bend there is "
              "not the device saturating. A full batch at the measured TPOT would give "
            + ", ".join(f"{r.batch_size}: {1e3 * r.batch_size / r.tpot_ms:,.0f}" for r in short)
            + " tokens/s.")
    if fit and fit["half_saturation_batch"] is not None:
        lines.append(
            f"TPOT ≈ {fit['fixed_ms']:.2f} ms + {fit['per_sequence_ms']:.3f} ms per sequence: a "
            f"full batch would approach {fit['ceiling_output_tokens_per_s']:,.0f} tokens/s and "
            f"reach half of it at {fit['half_saturation_batch']:.0f} sequences.")
    return lines


def _bend(slopes: list[PerfRow]) -> str:
    """Whether the step time per added sequence rises in the last interval."""
    last, earlier = slopes[-1], [r.tpot_per_added_sequence_ms for r in slopes[:-1]]
    if not earlier:
        return "One interval: no bend to judge."
    typical = float(np.median(earlier))
    if typical > 0 and last.tpot_per_added_sequence_ms > RISE * typical:
        return (f"Above the previous row the step time per added sequence rises to "
                f"{last.tpot_per_added_sequence_ms:.3f} ms from about {typical:.3f} ms: each step "
                f"gets slower per sequence, the device saturating.")
    return (f"The step time per added sequence does not rise in the last interval "
            f"({last.tpot_per_added_sequence_ms:.3f} ms against about {typical:.3f} ms before): "
            f"the device is not saturating there; a bend per listed row is the doubling of "
            f"the grid (each row adds more sequences than the one before).")
