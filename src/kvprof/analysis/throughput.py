"""Token and request throughput, over the selection and in time bins.

Output tokens are counted where they were sampled (the request-step replay),
input tokens when their request is first scheduled, requests when they finish.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NS_PER_S = 1e9
TARGET_BINS = 60
CHUNK = 1 << 20        # events binned at a time


@dataclass
class Tokens:
    """Token counts of the selection."""

    input: int          # prompt tokens of requests first scheduled in the selection
    cached_input: int   # of which served by the prefix cache at admission
    output: int         # tokens sampled in the selection
    scheduled: int      # tokens the scheduler gave out (the token budget's use)

    def to_dict(self) -> dict:
        return {"input": self.input, "cached_input": self.cached_input, "output": self.output,
                "total": self.input + self.output, "scheduled": self.scheduled}


@dataclass
class Throughput:
    """Rates over the selection, plus the same rates per time bin."""

    output_tokens_per_s: float
    input_tokens_per_s: float
    total_tokens_per_s: float
    scheduled_tokens_per_s: float
    requests_per_s: float
    bin_s: float
    over_time: dict[str, np.ndarray]   # t_s (bin start from the trace start), *_per_s

    def to_dict(self) -> dict:
        series = {name: values.tolist() for name, values in self.over_time.items()}
        return {"output_tokens_per_s": self.output_tokens_per_s,
                "input_tokens_per_s": self.input_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s,
                "scheduled_tokens_per_s": self.scheduled_tokens_per_s,
                "requests_per_s": self.requests_per_s,
                "over_time": {"bin_s": self.bin_s, **series}}


def nice_bin_s(duration_s: float, target_bins: int = TARGET_BINS) -> float:
    """A bin width of 1, 2 or 5 times a power of ten giving about ``target_bins`` bins."""
    raw = max(duration_s / target_bins, 1e-3)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-12))


def rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def throughput(tokens: Tokens, finished: int, duration_s: float, span_ns: tuple[int, int],
               origin_ns: int, events: dict[str, tuple[np.ndarray, np.ndarray]]) -> Throughput:
    """``events``: name -> (time ns, amount) of output tokens, input tokens, finished requests."""
    bin_s = nice_bin_s(duration_s)
    return Throughput(
        output_tokens_per_s=rate(tokens.output, duration_s),
        input_tokens_per_s=rate(tokens.input, duration_s),
        total_tokens_per_s=rate(tokens.input + tokens.output, duration_s),
        scheduled_tokens_per_s=rate(tokens.scheduled, duration_s),
        requests_per_s=rate(finished, duration_s),
        bin_s=bin_s, over_time=binned_rates(span_ns, origin_ns, bin_s, events))


def binned_rates(span_ns: tuple[int, int], origin_ns: int, bin_s: float,
                 events: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Amount per second in fixed bins covering ``span_ns``; bins start at ``t_s``."""
    start, end = span_ns
    width_ns = bin_s * NS_PER_S
    n_bins = max(int(math.ceil((end - start) / width_ns)), 1)
    columns = {"t_s": (start - origin_ns) / NS_PER_S + bin_s * np.arange(n_bins)}
    for name, (t_ns, amount) in events.items():
        totals = np.zeros(n_bins)
        for lo in range(0, t_ns.size, CHUNK):     # a day's steps: a chunk of temporaries at a time
            t, a = t_ns[lo:lo + CHUNK], amount[lo:lo + CHUNK]
            inside = (t >= start) & (t <= end)
            index = np.minimum(((t[inside] - start) // width_ns).astype(np.int64), n_bins - 1)
            # integer amounts: float64 sums are exact, so the chunking cannot change them
            totals += np.bincount(index, weights=a[inside].astype(np.float64), minlength=n_bins)
        columns[name] = totals / bin_s
    return columns
