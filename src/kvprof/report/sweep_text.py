"""The terminal report of ``kvprof sweep``: the study's three tables, the memory
components per batch size (with which memory each is), and the curve analysis."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kvprof.report.predict_text import sweep_section
from kvprof.report.text import num, pct


def _spread(values, digits: int = 1) -> str:
    if not values or values[0] == values[1]:
        return ""
    return f" ({values[0]:,.{digits}f}–{values[1]:,.{digits}f})"


def throughput_table(runs: list[dict], rounds: int) -> Table:
    table = Table(title=f"Throughput (mean over {rounds} rounds; range in brackets)",
                  title_justify="left")
    for name in ("batch size", "output tokens/s", "speed-up vs first", "mean running"):
        table.add_column(name, justify="right")
    for r in runs:
        table.add_row(str(r["batch_size"]),
                      num(r["output_tokens_per_s"]) + _spread(r["output_tokens_per_s_spread"]),
                      num(r["speedup"], 2, "x"), num(r["mean_running"], 1))
    return table


def latency_table(runs: list[dict]) -> Table:
    table = Table(title="Latency (ms; end-to-end from arrival, closed-loop client)",
                  title_justify="left")
    for name in ("batch size", "mean end-to-end", "increase", "TTFT", "TPOT", "queue"):
        table.add_column(name, justify="right")
    for r in runs:
        table.add_row(str(r["batch_size"]), num(r["mean_e2e_ms"]) + _spread(r["mean_e2e_ms_spread"]),
                      pct(r["e2e_increase"]), num(r["mean_ttft_ms"]), num(r["mean_tpot_ms"], 2),
                      num(r["mean_queue_ms"]))
    return table


def memory_table(runs: list[dict], device: str) -> Table:
    what = "NVML device memory" if device == "cuda" else "RSS of the engine's processes"
    table = Table(title=f"Peak memory ({what})", title_justify="left")
    for name in ("batch size", "peak MiB", "of capacity", "KV in use MiB", "of KV pool",
                 "preemptions"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in runs:
        table.add_row(str(r["batch_size"]), _mib_number(r["peak_memory_bytes"]),
                      pct(r["capacity_share"]), _mib_number(r["memory"]["kv_in_use_peak"]),
                      pct(r["kv_pool_share"]), str(r["preemptions"]))
    return table


def components_table(runs: list[dict], notes: dict) -> Table:
    table = Table(title="Memory components per batch size (MiB, mean over rounds)",
                  title_justify="left")
    table.add_column("component", no_wrap=True)
    for r in runs:
        table.add_column(f"bs={r['batch_size']}", justify="right", no_wrap=True)
    for name in notes:
        table.add_row(name, *[_mib_number(r["memory"].get(name)) for r in runs])
    return table


def _mib_number(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f}"


def component_legend(notes: dict) -> Table:
    table = Table(title="Which memory each component is", title_justify="left", show_header=False,
                  box=None, padding=(0, 1))
    table.add_column("component", no_wrap=True, style="bold")
    table.add_column("meaning", overflow="fold")
    for name, note in notes.items():
        table.add_row(name, note)
    return table


def render(report) -> Group:
    d = report.to_dict()
    runs = d["runs"]
    rounds = max((r["rounds"] for r in runs), default=0)
    parts = [throughput_table(runs, rounds), *[Text(note) for note in d["throughput_notes"]],
             latency_table(runs), *[Text(note) for note in d["latency_notes"]],
             sweep_section(d["step_time_model"]),
             memory_table(runs, d["device"]),
             components_table(runs, d["component_notes"]), component_legend(d["component_notes"])]
    parts.append(curve_section(d["curve"]))
    for warning in d["warnings"]:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    return Group(*parts)


def curve_section(curve: dict):
    try:
        from kvprof.report.curve_text import render_curve
    except ImportError:
        return Text(curve.get("explanation", ""))
    return render_curve(curve)
