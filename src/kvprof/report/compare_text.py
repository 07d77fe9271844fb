"""The terminal report of ``kvprof compare``: one table per group of measures, each run
side by side with its change against the baseline, then what differs in the
configuration, how noise was judged, and the warnings."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kvprof.report.text import mib, num, pct

GROUP_TITLES = {"throughput": "Throughput", "latency": "Latency (ms, finished requests)",
                "batch": "Batch composition", "kv": "KV cache", "step_time_model":
                "Step-time model terms", "memory": "Memory components"}


def value_text(value, unit: str) -> str:
    """A measure in its unit: fractions as %, bytes in MiB, model terms in µs."""
    if value is None:
        return "—"
    if unit == "fraction":
        return pct(value)
    if unit == "bytes":
        return mib(value)
    if unit == "ns":
        return num(value / 1e3, 3, "µs")
    return num(float(value), 2 if unit == "ms" else 1)


def change_text(change: dict | None, significant: bool | None, unit: str) -> str:
    """'+12.3 % *' (significant), '+12.3 % (noise)' or '+12.3 % (untested)'."""
    if change is None:
        return "—"
    relative = change["relative"]
    if relative is not None:
        size = f"{100 * relative:+.1f} %"
    elif unit == "fraction":
        size = f"{100 * change['absolute']:+.1f} pt"
    else:
        size = f"{change['absolute']:+,.4g}"
    mark = {True: " *", False: " (noise)", None: " (untested)"}[significant]
    return size + mark


def short_name(name: str) -> str:
    """The name without what its table's title already says."""
    for prefix in ("step_model_", "memory_"):
        name = name.removeprefix(prefix)
    return name.removesuffix("_bytes").removesuffix("_ns")


def group_table(group: str, metrics: list, labels: list[str]) -> Table:
    table = Table(title=GROUP_TITLES.get(group, group), title_justify="left")
    table.add_column("measure")
    table.add_column(labels[0], justify="right")
    for label in labels[1:]:
        table.add_column(label, justify="right")
        table.add_column("change", justify="right")
    for m in metrics:
        cells = [value_text(m.values[0], m.unit)]
        for i in range(1, len(labels)):
            cells += [value_text(m.values[i], m.unit), change_text(m.change[i], m.significant[i], m.unit)]
        style = "bold" if any(m.significant[1:]) else None
        table.add_row(short_name(m.name), *cells, style=style)
    return table


def config_table(comparison) -> Table:
    labels = [r["label"] for r in comparison.runs]
    table = Table(title="Configuration differences", title_justify="left")
    table.add_column("setting")
    for label in labels:
        table.add_column(label, justify="right")
    for diff in comparison.config_differences:
        table.add_row(diff["key"], *(str(v) for v in diff["values"]))
    if not comparison.config_differences:
        table.add_row("(none: same engine configuration and vLLM version)", *[""] * len(labels))
    return table


def render(comparison) -> Group:
    labels = [r["label"] for r in comparison.runs]
    head = Text(f"kvprof compare — baseline {labels[0]}; "
                + ", ".join(f"{r['label']}: {r['source']} ({r['rounds']} round"
                            f"{'s' if r['rounds'] != 1 else ''})" for r in comparison.runs))
    groups: dict[str, list] = {}
    for m in comparison.metrics:
        groups.setdefault(m.group, []).append(m)
    tables = [group_table(g, ms, labels) for g, ms in groups.items()]
    noise = comparison.noise.to_dict()
    notes = Text(f"* {noise['rule']} (method: {noise['method']}). "
                 f"'noise': within run-to-run noise; 'untested': a peak, a model term or a "
                 f"single memory reading, nothing to resample.")
    warnings = [Text(f"warning: {w}", style="yellow") for w in comparison.warnings]
    return Group(head, *tables, config_table(comparison), notes, *warnings)
