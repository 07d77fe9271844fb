"""A self-contained HTML page of ``kvprof compare``: the terminal report's tables, and a
matplotlib plot of the relative changes (inline PNG, nothing fetched)."""
from __future__ import annotations

import html

import numpy as np

from kvprof.report.compare_text import GROUP_TITLES, change_text, value_text
from kvprof.report.html import _STYLE, _figure, _png


def _cell(text: str) -> str:
    return f"<td>{html.escape(text)}</td>"


def metrics_table(metrics: list, labels: list[str]) -> str:
    head = "<tr><th>measure</th>" + "".join(
        f"<th>{html.escape(label)}</th>" + ("<th>change</th>" if i else "")
        for i, label in enumerate(labels)) + "</tr>"
    rows = []
    for m in metrics:
        cells = _cell(m.name) + _cell(value_text(m.values[0], m.unit))
        for i in range(1, len(labels)):
            cells += _cell(value_text(m.values[i], m.unit))
            cells += _cell(change_text(m.change[i], m.significant[i], m.unit))
        rows.append(f"<tr>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def change_plot(comparison) -> str:
    """Relative change of every significant measure against the baseline, one bar per run."""
    labels = [r["label"] for r in comparison.runs]
    shown = [m for m in comparison.metrics if any(m.significant[1:])
             and all(c is None or c["relative"] is not None for c in m.change)]
    if not shown:
        return "<p>No measure changed by more than run-to-run noise.</p>"
    fig, ax = _figure(9, 0.3 * len(shown) * (len(labels) - 1) + 1.2)
    y = np.arange(len(shown))
    height = 0.8 / (len(labels) - 1)
    for i in range(1, len(labels)):
        values = [100 * (m.change[i]["relative"] if m.change[i] else 0) for m in shown]
        ax.barh(y + (i - 1) * height, values, height, label=labels[i])
    ax.set_yticks(y + 0.4 - height / 2, [m.name for m in shown])
    ax.axvline(0, color="grey")
    ax.set(xlabel=f"change against {labels[0]} (%)", title="Significant changes")
    ax.legend()
    return _png(fig)


def render(comparison) -> str:
    labels = [r["label"] for r in comparison.runs]
    groups: dict[str, list] = {}
    for m in comparison.metrics:
        groups.setdefault(m.group, []).append(m)
    runs = "".join(f"<li>{html.escape(r['label'])}: {html.escape(r['source'])} "
                   f"({r['rounds']} rounds)</li>" for r in comparison.runs)
    config = "".join(f"<tr><td>{html.escape(d['key'])}</td>"
                     + "".join(_cell(str(v)) for v in d["values"]) + "</tr>"
                     for d in comparison.config_differences) or "<tr><td>none</td></tr>"
    sections = "".join(f"<h2>{GROUP_TITLES.get(g, g)}</h2>{metrics_table(ms, labels)}"
                       for g, ms in groups.items())
    warnings = "".join(f"<p><b>warning:</b> {html.escape(w)}</p>" for w in comparison.warnings)
    rule = html.escape(comparison.noise.to_dict()["rule"])
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kvprof compare</title>"
            f"<style>{_STYLE}</style></head><body><h1>kvprof compare</h1><ul>{runs}</ul>"
            f"{warnings}<p>* {rule}.</p>{change_plot(comparison)}{sections}"
            f"<h2>Configuration differences</h2><table>{config}</table></body></html>")
