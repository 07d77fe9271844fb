"""Terminal tables of the step-time model: its costs with intervals, its predictions, and
the leave-one-batch-size-out check (``kvprof predict``, ``kvprof sweep``, ``kvprof analyze``)."""
from __future__ import annotations

from rich.table import Table

from kvprof.analysis.step_model import COEFFICIENTS, TERM_NAMES
from kvprof.report.text import num, pct

UNITS = {"fixed_ns": (1e3, "µs", 1), "per_decode_request_ns": (1e3, "µs", 2),
         "per_prefill_token_ns": (1e3, "µs", 3), "per_context_token_ns": (1.0, "ns", 2)}


def costs_table(model: dict, title: str = "Step-time model (non-negative costs, 95 % interval)") -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("cost", "value", "interval", "separable"):
        table.add_column(name, justify="left" if name in ("cost", "separable") else "right")
    intervals = model.get("intervals") or {}
    for key, label in zip(COEFFICIENTS, TERM_NAMES):
        div, unit, digits = UNITS[key]
        low, high = intervals.get(key) or (None, None)
        table.add_row(label, num(model["coefficients"][key] / div, digits, unit),
                      "—" if low is None else f"{low / div:,.{digits}f}–{high / div:,.{digits}f}",
                      (model.get("unseparable") or {}).get(key, "yes"))
    table.caption = (f"{model['steps']:,} steps, R² {model['r2']:.3f}, RMSE {model['rmse_ms']:.3f} ms; "
                     f"time per step = schedule start to the next schedule start")
    return table


SHORT = {"fixed per step": "fixed", "per decode request": "decode",
         "per prefill token": "prefill", "per context token": "context"}


def predictions_table(predictions: list[dict], title: str = "Predicted") -> Table:
    table = Table(title=title, title_justify="left", caption="tok/s: output tokens/s; 95 %: its "
                  "interval; TPOT, e2e: mean time per output token, end-to-end latency (ms)")
    for name in ("bs", "tok/s", "95 %", "step ms", "TPOT", "e2e", "running", "dominant", "note"):
        table.add_column(name, justify="left" if name in ("dominant", "note") else "right")
    for p in predictions:
        low, high = p["interval"] or (None, None)
        notes = [n for n, on in (("extrapolated", p["extrapolated"]),
                                 ("beyond the KV pool", p.get("fits_kv") is False)) if on]
        if p.get("refused"):
            notes.append(f"no number: {p['refused']}")
        table.add_row(str(p["batch_size"]), num(p["output_tokens_per_s"], 0),
                      "—" if low is None else f"{low:,.0f}–{high:,.0f}", num(p["step_ms"], 2),
                      num(p.get("tpot_ms"), 2), num(p["mean_e2e_ms"], 0), num(p.get("mean_running"), 1),
                      SHORT.get(p.get("dominant_term"), "—"), "; ".join(notes))
    return table


def leave_one_out_table(rows: list[dict]) -> Table:
    table = Table(title="Each batch size predicted from the others (output tokens/s; "
                        "end-to-end ms)", title_justify="left")
    for name in ("bs", "measured (rounds)", "predicted (95 %)", "error", "e2e", "predicted",
                 "error", "speed", ""):
        table.add_column(name, justify="right" if name else "left")
    for r in rows:
        low, high = r["interval"] or (None, None)
        lo, hi = r["measured_range"]
        where = "interior" if r["interior"] else "extrapolated" if r["extrapolated"] else "edge"
        table.add_row(str(r["batch_size"]), f"{r['measured_output_tokens_per_s']:,.0f} ({lo:,.0f}–{hi:,.0f})",
                      f"{num(r['predicted_output_tokens_per_s'], 0)}"
                      + ("" if low is None else f" ({low:,.0f}–{high:,.0f})"), pct(r["error"]),
                      num(r["measured_e2e_ms"], 0), num(r["predicted_e2e_ms"], 0), pct(r["e2e_error"]),
                      _speed(r), where + (f" (no number: {r['refused']})" if r["refused"] else ""))
    return table


def _speed(row: dict) -> str:
    """Its steps' time against the others' model, and why it is off (a setting or noise)."""
    ratio = row.get("step_time_ratio")
    if ratio is None:
        return "—"
    return f"{ratio:.2f}x" + (f" {row['speed']}" if row.get("speed") else "")


def sweep_section(model: dict | None):
    """The sweep report's throughput-and-latency part: costs, leave-one-out, the words."""
    from rich.console import Group
    from rich.text import Text
    if model is None:
        return Text("Step-time model: too few steps to fit.")
    return Group(costs_table(model, "Step-time model, all batch sizes jointly (non-negative "
                                    "costs, 95 % interval)"),
                 *[Text(note) for note in model["notes"]], leave_one_out_table(model["leave_one_out"]))
