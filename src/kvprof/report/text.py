"""The terminal report: one rich table per topic of an ``Analysis``."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kvprof.analysis.latency import KINDS

_LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "end-to-end",
                  "queue": "queue"}


def num(value, digits: int = 1, unit: str = "") -> str:
    """A number for a table cell; '—' for a value that was not measured."""
    if value is None:
        return "—"
    if isinstance(value, int):
        text = f"{value:,}"
    else:
        text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f} MiB"


def _pairs(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def overview(a) -> Table:
    window = "whole trace"
    if a.window_s is not None:
        end = "the end" if a.window_s[1] == float("inf") else f"{a.window_s[1]:g} s"
        window = f"steps starting from {a.window_s[0]:g} s to {end}"
    return _pairs(f"kvprof analyze — {a.path}", [
        ("format", a.format_version), ("selection", window),
        ("duration", num(a.duration_s, 3, "s")), ("steps", num(a.steps)),
        ("requests (finished / unfinished)",
         f"{a.requests:,} ({a.requests_finished:,} / {a.requests_unfinished:,})"),
        ("tokens in / out", f"{a.tokens.input:,} / {a.tokens.output:,}"),
    ])


def throughput(a) -> Table:
    t = a.throughput
    return _pairs("Throughput", [
        ("output tokens/s", num(t.output_tokens_per_s)),
        ("input tokens/s", num(t.input_tokens_per_s)),
        ("total tokens/s", num(t.total_tokens_per_s)),
        ("scheduled tokens/s", num(t.scheduled_tokens_per_s)),
        ("requests/s", num(t.requests_per_s, 2)),
    ])


def latency(a) -> Table:
    table = Table(title="Latency (ms, finished requests)", title_justify="left")
    for column in ("", "mean", "p50", "p90", "p99", "n"):
        table.add_column(column, justify="left" if not column else "right")
    for kind in KINDS:
        s = getattr(a.latency, kind)
        digits = 2 if kind in ("tpot", "itl") else 1
        table.add_row(_LATENCY_NAMES[kind], *(num(v, digits) for v in (s.mean, s.p50, s.p90, s.p99)),
                      num(s.count))
    return table


def batch(a) -> Table:
    b = a.batch
    return _pairs("Batch composition", [
        ("running mean / p50 / p90 / max",
         f"{b.mean_running:.1f} / {b.p50_running:g} / {b.p90_running:g} / {b.max_running}"),
        ("waiting mean / max", f"{b.mean_waiting:.1f} / {b.max_waiting}"),
        ("steps decode-only / prefill-only / mixed / idle",
         f"{b.decode_only_steps} / {b.prefill_only_steps} / {b.mixed_steps} / {b.idle_steps}"),
        ("prefill share of scheduled tokens", pct(b.prefill_token_share)),
        ("steps at max_num_seqs", f"{pct(b.steps_at_max_seqs)} (max_num_seqs={b.max_num_seqs})"),
        ("token budget use (mean)",
         f"{pct(b.mean_token_budget_use)} of {num(b.max_num_batched_tokens)}"),
    ])


def kv(a) -> Table:
    k = a.kv
    return _pairs("KV cache", [
        ("blocks peak / mean / total",
         f"{k.peak_blocks_used} / {k.mean_blocks_used:.1f} / {num(k.blocks_total)}"),
        ("peak utilisation", pct(k.peak_utilization)),
        ("bytes per block", num(k.bytes_per_block)),
        ("prefix-hit rate", pct(k.prefix_hit_rate)),
        ("preemptions", num(k.preemptions)),
        ("tokens thrown away / recomputed", f"{k.preempted_tokens:,} / {k.recomputed_tokens:,}"),
    ])


def memory(a) -> Table:
    table = Table(title="Memory readings", title_justify="left")
    for column in ("reading", "first", "min", "max", "last"):
        table.add_column(column, justify="left" if column == "reading" else "right")
    for name, r in a.memory.readings.items():
        if r.samples:
            table.add_row(name.removesuffix("_bytes"), mib(r.first), mib(r.min), mib(r.max), mib(r.last))
    return table


def step_model(a):
    from kvprof.report.predict_text import costs_table, predictions_table
    m = a.step_time_model.to_dict()
    if m["coefficients"] is None:
        return _pairs("Step-time model", [("steps fitted", num(m["steps"])), ("fit", "too few steps")])
    parts = [costs_table(m)]
    if m["check"]:
        c = m["check"]
        low, high = c["interval"]
        parts.append(Text(f"Check at the batch size run ({c['batch_size']}): "
                          f"{num(c['predicted_output_tokens_per_s'])} tok/s predicted "
                          f"({low:,.0f}–{high:,.0f}) vs {num(c['measured_output_tokens_per_s'])} measured"))
    if m["predictions"]:
        parts.append(predictions_table(m["predictions"], "Predicted at other batch sizes "
                                                         "(this trace's requests, closed loop)"))
    return Group(*parts)


def device(a) -> Table | None:
    """GPU time by kernel category (the CUPTI collector), over the run and per step."""
    d = a.device_time
    if not d.steps:
        return None
    table = Table(title=f"GPU time by category (CUPTI, {d.steps:,} steps, {d.records:,} records)",
                  title_justify="left")
    for column in ("category", "total ms", "share", "per step mean ms", "p50", "p90", "max"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, total in d.total_ns.items():
        s = d.per_step_ns[name]
        table.add_row(name, num(total / 1e6, 2), pct(d.share[name]),
                      *(num(v / 1e6, 3) for v in (s.mean, s.p50, s.p90, s.max)))
    if d.kernel_share_of_device_time is not None:
        table.caption = f"kernel time / CUDA-event device time: {pct(d.kernel_share_of_device_time)}"
    return table


def host_time(a) -> Table:
    table = Table(title="Host time in steps (py-spy)", title_justify="left")
    table.add_column("process", no_wrap=True)
    for part in ("sampled", "sched", "KV", "runner", "I/O", "kvprof", "other"):
        table.add_column(part, justify="right", no_wrap=True)
    for name, p in a.host_time.processes.items():
        shares = p.shares
        table.add_row(name, pct(p.sampled_ns / p.window_ns if p.window_ns else 0.0),
                      *(pct(shares[k]) for k in shares))
    return table


def ranks(a) -> Table | None:
    """Per worker rank: forward time and how often it was the longest or started last."""
    r = a.ranks
    if r is None or not r.steps:
        return None
    table = Table(title=f"Worker ranks ({r.steps:,} steps with every rank, {r.time_source})",
                  title_justify="left")
    for column in ("rank", "forward mean ms", "p50", "p99", "longest in", "last to start in",
                   "late by (mean ms)"):
        table.add_column(column, justify="right")
    for rank, p in r.per_rank.items():
        table.add_row(str(rank), num(p.forward_ms_mean, 3), num(p.forward_ms_p50, 3),
                      num(p.forward_ms_p99, 3), pct(p.longest_share), pct(p.last_start_share),
                      num(p.late_start_ms_mean, 3))
    spread, skew = r.duration_spread_ms, r.start_skew_ms
    late = (f"; rank {r.late_starter} starts last in most steps (the others wait for it)"
            if r.late_starter is not None else "")
    table.caption = (f"spread between ranks per step: mean {num(spread.mean, 3)} ms, p99 "
                     f"{num(spread.p99, 3)} ms ({pct(r.waiting_share)} of forward time spent "
                     f"waiting); start skew mean {num(skew.mean, 3)} ms{late}")
    return table


def render(analysis) -> Group:
    """All tables, in reading order (the GPU breakdown only where the collector ran, host
    time only where py-spy sampled, ranks only with several workers)."""
    parts = [overview, throughput, latency, batch, kv, memory, device, ranks, step_model]
    if analysis.host_time is not None:
        parts.append(host_time)
    parts = (part(analysis) for part in parts)
    return Group(*(p for p in parts if p is not None))
