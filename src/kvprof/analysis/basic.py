"""The first summary of a trace, now a thin view of the full analyzer (``kvprof.analysis``).

Kept so that existing callers (``summarize(trace)["tokens"]["output"]``) keep working; the
dict is the JSON report of ``kvprof analyze`` (docs/analyses.md).
"""
from __future__ import annotations


def summarize(trace) -> dict:
    """``analyze(trace).to_dict()``: totals, throughput, latency, batch, KV, step-time model."""
    from kvprof.analysis import analyze
    return analyze(trace).to_dict()
