"""The terminal report of a data-parallel deployment: replicas side by side, then the whole."""
from __future__ import annotations

from types import SimpleNamespace

from rich.console import Group
from rich.table import Table

from kvprof.report.text import _pairs, latency, num


def render(path: str, dep) -> Group:
    return Group(replicas_table(dep), whole(path, dep),
                 latency(SimpleNamespace(latency=dep.latency)))


def replicas_table(dep) -> Table:
    table = Table(title=f"Data-parallel deployment, {len(dep.replicas)} replicas",
                  title_justify="left")
    for column in ("dp", "steps", "req", "req %", "out tok", "tok %", "out tok/s",
                   "running", "busy %"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in dep.replicas:
        table.add_row(str(r.rank), num(r.steps), num(r.requests_finished), share(r.request_share),
                      num(r.output_tokens), share(r.output_token_share),
                      num(r.output_tokens_per_s), num(r.mean_running, 2), share(r.busy_share))
    table.caption = ("running: mean sequences per step; busy: the replica's traced duration "
                     "over the deployment's span")
    return table


def share(value: float) -> str:
    return f"{100 * value:.1f}"


def whole(path: str, dep) -> Table:
    b = dep.balance
    return _pairs(f"kvprof analyze — {path} (all replicas)", [
        ("span (first step of any replica to the last)", num(dep.span_s, 3, "s")),
        ("requests finished", num(dep.requests_finished)),
        ("tokens in / out", f"{dep.input_tokens:,} / {dep.output_tokens:,}"),
        ("output tokens/s", num(dep.output_tokens_per_s)),
        ("requests/s", num(dep.requests_per_s, 2)),
        ("balance: requests, max / mean", num(b.requests_max_over_mean, 2)),
        ("balance: output tokens, max / mean", num(b.output_tokens_max_over_mean, 2)),
        ("busiest replica (output tokens)", f"dp{b.busiest_rank}"),
    ])
