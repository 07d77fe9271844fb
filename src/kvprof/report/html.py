"""A self-contained HTML report: the JSON's numbers as tables and matplotlib plots as inline
base64 PNGs (no files beside it, no scripts, nothing fetched)."""
from __future__ import annotations

import base64
import html
import io

import numpy as np

from kvprof.analysis.latency import KINDS
from kvprof.report.json_report import clean

MAX_POINTS = 4000
_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}
h2{border-bottom:1px solid #ddd}"""


def _figure(width: float = 9.0, height: float = 3.2, ncols: int = 1):
    from matplotlib.figure import Figure   # the Agg canvas, without pyplot's global state
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _thin(*columns: np.ndarray) -> list[np.ndarray]:
    """Every k-th point, so that plots of long traces stay small."""
    arrays = [c.to_numpy() if hasattr(c, "to_numpy") else np.asarray(c) for c in columns]
    stride = max(len(arrays[0]) // MAX_POINTS, 1)
    return [c[::stride] for c in arrays]


def throughput_plot(a) -> str:
    t = a.throughput.over_time
    fig, ax = _figure()
    x = t["t_s"] + a.throughput.bin_s / 2
    for name in ("output_tokens_per_s", "input_tokens_per_s"):
        ax.plot(x, t[name], label=name.replace("_", " "), drawstyle="steps-mid")
    ax.set(xlabel="time from trace start (s)", ylabel="tokens/s",
           title=f"Throughput over time ({a.throughput.bin_s:g} s bins)")
    ax.legend()
    return _png(fig)


def queue_plot(a) -> str:
    tl = a.timeline
    t, running, waiting = _thin(tl.column("t_s"), tl.column("running"), tl.column("waiting"))
    fig, ax = _figure()
    ax.plot(t, running, label="running", drawstyle="steps-post")
    ax.plot(t, waiting, label="waiting", drawstyle="steps-post")
    ax.set(xlabel="time from trace start (s)", ylabel="requests", title="Running and waiting")
    ax.legend()
    return _png(fig)


def kv_plot(a) -> str:
    tl = a.timeline
    t, used = _thin(tl.column("t_s"), tl.column("kv_blocks_used"))
    fig, ax = _figure()
    ax.plot(t, used, label="blocks in use", drawstyle="steps-post")
    if a.kv.blocks_total:
        ax.axhline(a.kv.blocks_total, color="grey", linestyle="--", label="usable blocks")
    ax.set(xlabel="time from trace start (s)", ylabel="KV blocks", title="KV blocks in use")
    ax.legend()
    return _png(fig)


def latency_plot(a) -> str:
    fig, axes = _figure(12, 3.0, ncols=4)
    for ax, kind in zip(axes, ("ttft", "tpot", "e2e")):
        values = a.latency.kind_ms(kind)
        ax.hist(values[~np.isnan(values)], bins=40)
        ax.set(title=kind.upper() if kind != "e2e" else "end-to-end", xlabel="ms")
    itl = a.latency
    if itl.itl_counts.size:
        axes[3].hist(itl.itl_values_ms, bins=40, weights=itl.itl_counts)
    axes[3].set(title="ITL", xlabel="ms")
    axes[0].set_ylabel("count")
    return _png(fig)


def step_time_plot(a) -> str:
    tl = a.timeline
    busy = tl.column("total_tokens").to_numpy() > 0
    decode, prefill, step_ms, context = (tl.column(n).to_numpy()[busy] for n in
                                         ("decode_requests", "prefill_tokens", "step_ms", "context_tokens"))
    decode, prefill, step_ms, context = _thin(decode, prefill, step_ms, context)
    fig, (left, right) = _figure(12, 3.6, ncols=2)
    dots = left.scatter(decode, step_ms, c=prefill, s=6, cmap="viridis")
    fig.colorbar(dots, ax=left, label="prefill tokens")
    left.set(xlabel="decode requests in the step", ylabel="step time (ms)",
             title="Step time against batch composition")
    coef = a.step_time_model.fit.coefficients
    if coef:
        predicted = (coef["fixed_ns"] + coef["per_decode_request_ns"] * decode
                     + coef["per_prefill_token_ns"] * prefill
                     + coef["per_context_token_ns"] * context) / 1e6
        right.scatter(predicted, step_ms, s=6)
        top = max(float(predicted.max(initial=0)), float(step_ms.max(initial=0)))
        right.plot([0, top], [0, top], color="grey", linestyle="--")
    right.set(xlabel="model (ms)", ylabel="measured (ms)",
              title=f"Step-time model, R² = {_fmt(a.step_time_model.fit.r2)}")
    return _png(fig)


def memory_plot(a) -> str:
    tl = a.timeline
    t, rss, used = _thin(tl.column("t_s"), tl.column("rss_bytes"), tl.column("kv_blocks_used"))
    fig, ax = _figure()
    ax.plot(t, np.asarray(rss) / 2**20, label="EngineCore RSS", drawstyle="steps-post")
    if a.kv.bytes_per_block:
        ax.plot(t, np.asarray(used) * a.kv.bytes_per_block / 2**20, label="KV blocks in use",
                drawstyle="steps-post")
    ax.set(xlabel="time from trace start (s)", ylabel="MiB", title="Memory over the run")
    ax.legend()
    return _png(fig)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                    for k, v in rows.items() if not isinstance(v, (dict, list)))
    return f"<table>{cells}</table>"


def _latency_table(report: dict) -> str:
    head = "<tr><th></th><th>mean</th><th>p50</th><th>p90</th><th>p99</th><th>n</th></tr>"
    body = "".join(
        f"<tr><td>{k}</td>" + "".join(f"<td>{_fmt(report[k][c])}</td>"
                                       for c in ("mean", "p50", "p90", "p99", "count")) + "</tr>"
        for k in KINDS)
    return f"<table>{head}{body}</table>"


def _ranks_tables(ranks: dict) -> str:
    """The skew summary, then one row per rank."""
    spreads = {f"{name} {stat}": value for name in ("duration_spread_ms", "start_skew_ms")
               for stat, value in ranks[name].items()} if ranks["steps"] else {}
    per_rank = ranks["per_rank"]
    columns = next(iter(per_rank.values()), {}).keys()
    head = "<tr><th>rank</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = "".join(f"<tr><td>{r}</td>" + "".join(f"<td>{_fmt(p[c])}</td>" for c in columns)
                   + "</tr>" for r, p in per_rank.items())
    return _table({**ranks, **spreads}) + f"<table>{head}{body}</table>"


def render(analysis) -> str:
    """The whole page as one string."""
    a, report = analysis, clean(analysis.to_dict())
    model = report["step_time_model"]
    sections = [
        ("Overview", _table({k: report[k] for k in ("trace", "format_version", "duration_s",
                                                     "steps", "requests", "requests_finished",
                                                     "requests_unfinished")})
         + _table(report["tokens"])),
        ("Throughput", _table(report["throughput"]) + throughput_plot(a)),
        ("Batch composition", _table(report["batch"]) + queue_plot(a)),
        ("KV cache", _table(report["kv"]) + kv_plot(a)),
        ("Latency (ms)", _latency_table(report["latency_ms"]) + latency_plot(a)),
        ("Step-time model", _table(model["coefficients"] or {}) + _table(model)
         + "".join(_table(p) for p in model["predictions"]) + step_time_plot(a)),
        ("Memory", memory_plot(a)),
    ]
    if report["ranks"]:
        sections.append(("Worker ranks", _ranks_tables(report["ranks"])))
    warnings = "".join(f"<p><b>warning:</b> {html.escape(w)}</p>" for w in a.warnings)
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kvprof — "
            f"{html.escape(a.path)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>kvprof analyze</h1>{warnings}{body}</body></html>")
