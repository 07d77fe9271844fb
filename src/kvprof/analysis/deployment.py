"""A data-parallel deployment: its replicas' analyses merged, and how evenly they were loaded.

Each replica's EngineCore writes a trace of its own (``NAME.dp<rank>.arrow``). The
deployment's figures come from the replicas' analyses alone, without re-reading
rows: latencies merge exactly (each analysis keeps its per-request values and its
ITL as value/count pairs), token counts add up, and throughput is over the
deployment's span, from the first step of any replica to the last. The span needs
one clock: replicas on one machine share ``time.monotonic_ns()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvprof.analysis.latency import KINDS, Latency, summarised

NS_PER_S = 1e9


@dataclass
class ReplicaLoad:
    """One replica's share of the deployment's work."""

    rank: int
    path: str
    steps: int
    requests_finished: int
    output_tokens: int
    input_tokens: int
    output_tokens_per_s: float     # over its own duration
    mean_running: float
    busy_share: float              # its duration / the deployment's span
    request_share: float           # of the deployment's finished requests
    output_token_share: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Balance:
    """max / mean over replicas (1.0: perfectly even); the busiest replica by output tokens."""

    requests_max_over_mean: float
    output_tokens_max_over_mean: float
    busiest_rank: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Deployment:
    replicas: list[ReplicaLoad]
    span_s: float
    requests_finished: int
    input_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    input_tokens_per_s: float
    requests_per_s: float
    latency: Latency
    balance: Balance

    def to_dict(self) -> dict:
        return {"replicas": [r.to_dict() for r in self.replicas], "span_s": self.span_s,
                "requests_finished": self.requests_finished,
                "tokens": {"input": self.input_tokens, "output": self.output_tokens},
                "throughput": {"output_tokens_per_s": self.output_tokens_per_s,
                               "input_tokens_per_s": self.input_tokens_per_s,
                               "requests_per_s": self.requests_per_s},
                "latency_ms": self.latency.to_dict(), "balance": self.balance.to_dict()}


def deployment(replicas: list[tuple[int, object]]) -> Deployment:
    """``replicas``: (data-parallel rank, ``Analysis``) of each replica's trace."""
    analyses = [a for _, a in replicas]
    start = min(a.span_ns[0] for a in analyses)
    end = max(a.span_ns[1] for a in analyses)
    span_s = (end - start) / NS_PER_S
    finished = sum(a.requests_finished for a in analyses)
    tokens_in = sum(a.tokens.input for a in analyses)
    tokens_out = sum(a.tokens.output for a in analyses)
    loads = [_load(rank, a, span_s, finished, tokens_out) for rank, a in replicas]
    return Deployment(loads, span_s, finished, tokens_in, tokens_out,
                      _rate(tokens_out, span_s), _rate(tokens_in, span_s), _rate(finished, span_s),
                      merged_latency([a.latency for a in analyses]), _balance(loads))


def merged_latency(parts: list[Latency]) -> Latency:
    """The latency of all requests of all parts, exactly as if they were one trace."""
    per_request = {kind: np.concatenate([p.per_request_ms[kind] for p in parts])
                   for kind in KINDS if kind != "itl"}
    return summarised(per_request, np.concatenate([p.itl_values_ns for p in parts]),
                      np.concatenate([p.itl_counts for p in parts]))


def _load(rank: int, a, span_s: float, finished: int, tokens_out: int) -> ReplicaLoad:
    return ReplicaLoad(rank, a.path, a.steps, a.requests_finished, a.tokens.output,
                       a.tokens.input, a.throughput.output_tokens_per_s, a.batch.mean_running,
                       a.duration_s / span_s if span_s else 0.0,
                       a.requests_finished / finished if finished else 0.0,
                       a.tokens.output / tokens_out if tokens_out else 0.0)


def _balance(loads: list[ReplicaLoad]) -> Balance:
    requests = np.array([r.requests_finished for r in loads], np.float64)
    tokens = np.array([r.output_tokens for r in loads], np.float64)
    return Balance(_max_over_mean(requests), _max_over_mean(tokens),
                   loads[int(tokens.argmax())].rank)


def _max_over_mean(values: np.ndarray) -> float:
    return float(values.max() / values.mean()) if values.mean() > 0 else 0.0


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0
