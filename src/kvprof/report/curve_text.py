"""The terminal report of a memory curve (``kvprof curve``, and the sweep report's part).

Works on the report dict (``CurveReport.to_dict()``), so a saved JSON report renders too.
"""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

_BINARY = (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10))


def _unit(report: dict) -> tuple[str, float]:
    unit = report.get("unit") or {}
    return unit.get("name", "bytes"), float(unit.get("bytes", 1.0))


def _num(value, size: float, signed: bool = False) -> str:
    if value is None:
        return "—"
    v = value / size
    text = f"{v:+#.3g}" if signed else f"{v:#.3g}"
    if abs(v) >= 1000:
        text = f"{v:+,.0f}" if signed else f"{v:,.0f}"
    return text.rstrip(".").replace("-", "−")


def _auto(value) -> str:
    if value is None:
        return "—"
    for name, size in _BINARY:
        if abs(value) >= size:
            return f"{_num(value, size)} {name}"
    return f"{value:,.0f} B"


def points_table(report: dict) -> Table:
    name, size = _unit(report)
    table = Table(title=f"Memory by batch size ({name})", title_justify="left")
    for column in ("batch size", "memory", "rounds", "row adds", "sequences added",
                   "per added sequence"):
        table.add_column(column, justify="right")
    segments = report.get("segments", [])
    for i, p in enumerate(report.get("points", [])):
        seg = segments[i - 1] if 0 < i <= len(segments) else None
        table.add_row(str(p["batch_size"]), _num(p["mean_bytes"], size), str(len(p["rounds"])),
                      _num(seg["delta_bytes"], size, True) if seg else "",
                      str(seg["added_seqs"]) if seg else "",
                      _num(seg["slope_per_seq"], size) if seg else "")
    return table


def breakpoints_table(report: dict) -> Table:
    name, size = _unit(report)
    table = Table(title=f"Slope changes ({name} per added sequence)", title_justify="left")
    for column in ("batch size", "component", "before", "after", "change", "t", "real?", "cause"):
        table.add_column(column, justify="left" if column in ("component", "cause") else "right")
    for b in report.get("breakpoints", []):
        table.add_row(str(b["bs"]), b["component"], _num(b["slope_before"], size),
                      _num(b["slope_after"], size), _num(b["change_per_seq"], size, True),
                      "—" if b["statistic"] is None else f"{b['statistic']:.3g}",
                      "yes" if b["significant"] else "no", b.get("cause") or "—")
    return table


def components_table(report: dict) -> Table:
    table = Table(title="Components (slopes per added sequence)", title_justify="left")
    for column in ("component", "first", "last", "overall slope", "real slope changes"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for name, c in report["components"].items():
        points = c.get("points", [])
        real = [f"{b['bs']} ({b.get('cause') or '?'})" for b in c.get("breakpoints", [])
                if b["significant"]]
        table.add_row(name, _auto(points[0]["mean_bytes"]) if points else "—",
                      _auto(points[-1]["mean_bytes"]) if points else "—",
                      _auto(c.get("overall_slope_per_seq")), ", ".join(real) or "none")
    return table


def render_curve(report: dict) -> Group:
    """Points and per-sequence slopes, slope changes, components (sweep), the explanation."""
    parts = [points_table(report)]
    if report.get("breakpoints"):
        parts.append(breakpoints_table(report))
    if report.get("components"):
        parts.append(components_table(report))
    warnings = set(report.get("warnings", []))
    explanation = [line for line in report.get("explanation", "").splitlines()
                   if line not in warnings]
    parts.append(Text("\n".join(explanation)))
    parts += [Text(f"warning: {w}", style="yellow") for w in report.get("warnings", [])]
    if report.get("performance"):
        parts.append(performance_table(report["performance"]))
        parts += [Text(line) for line in report["performance"]["explanation"]]
    return Group(*parts)


def performance_table(perf: dict) -> Table:
    """Throughput and latency columns, per added sequence (analysis/curve_perf.py)."""
    table = Table(title="Throughput and latency per added sequence", title_justify="left")
    for name in ("batch size", "output tok/s", "per added seq", "latency ms", "TPOT ms",
                 "TPOT per added seq", "running (tok/s x TPOT)"):
        table.add_column(name, justify="right")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for r in perf["rows"]:
        table.add_row(str(r["batch_size"]), fmt(r["output_tokens_per_s"], ",.0f"),
                      fmt(r["gain_per_added_sequence"], "+,.1f"), fmt(r["latency_ms"], ",.0f"),
                      fmt(r["tpot_ms"], ".2f"), fmt(r["tpot_per_added_sequence_ms"], "+.3f"),
                      fmt(r["implied_running"], ".1f"))
    return table
