"""The terminal report of merged summaries: totals, throughput over the traced time, latency."""
from __future__ import annotations

from types import SimpleNamespace

from rich.console import Group
from rich.table import Table

from kvprof.analysis.quantiles import RELATIVE_ERROR
from kvprof.report.text import _pairs, latency, num


def render(whole) -> Group:
    return Group(totals(whole), latency(SimpleNamespace(latency=whole.latency())))


def totals(whole) -> Table:
    rate = whole.throughput()
    t = whole.tokens
    table = _pairs(f"kvprof merge — {len(whole.traces)} traces", [
        ("traced time (summed)", num(whole.duration_s, 3, "s")),
        ("steps", num(whole.steps)),
        ("requests finished", num(whole.requests_finished)),
        ("tokens in (cached) / out", f"{t['input']:,} ({t['cached_input']:,}) / {t['output']:,}"),
        ("output tokens/s", num(rate["output_tokens_per_s"])),
        ("requests/s", num(rate["requests_per_s"], 2)),
    ])
    table.caption = ("percentiles exact" if whole.exact else
                     f"percentiles within {100 * RELATIVE_ERROR:g} % (relative): "
                     f"some parts were too long to keep every value")
    return table
