"""The memory curve in words: byte units, slopes per added sequence, slope changes, model sizes.

Pure string building on ``curve_fit``'s results; ``curve`` and ``curve_causes`` compose
these into the explanation.
"""
from __future__ import annotations

import numpy as np

from kvprof.analysis.curve_fit import MIN_RELATIVE_CHANGE, Breakpoint, Segment, Series

DECIMAL = {"GB": 1e9, "MB": 1e6, "kB": 1e3}
BINARY = {"GiB": 2.0**30, "MiB": 2.0**20, "KiB": 2.0**10}


class Units:
    """Bytes in words: a fixed unit for the main series, auto-scaled for components."""

    def __init__(self, name: str, size: float, family: dict):
        self.name, self.size, self.family = name, size, family

    def main(self, value: float, signed: bool = False) -> str:
        return _number(value / self.size, signed) + f" {self.name}"

    def auto(self, value: float, signed: bool = False) -> str:
        if abs(value) < 0.5:
            return "0 bytes"
        for name, size in self.family.items():
            if abs(value) >= size:
                return _number(value / size, signed) + f" {name}"
        return _number(value, signed) + " bytes"


def _number(value: float, signed: bool) -> str:
    if value == 0:
        return "0"
    text = f"{value:#.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    text = text.rstrip(".")
    return ("+" + text) if signed and value > 0 else text.replace("-", "\u2212")


def units_for(series: Series, unit: str | None) -> Units:
    """The input's unit when given, else one that shows the per-row changes well."""
    deltas = np.abs(np.diff(series.means))
    scale = float(deltas.max()) if deltas.size and deltas.max() > 0 else float(np.max(np.abs(series.means)))
    return choose_units(scale, unit)


def choose_units(largest: float, unit: str | None) -> Units:
    if unit == "GB":
        return Units("GB", 1e9, DECIMAL)
    if unit == "MiB":
        return Units("MiB", 2.0**20, BINARY)
    for name, size in BINARY.items():
        if largest >= size:
            return Units(name, size, BINARY)
    return Units("bytes", 1.0, BINARY)


def joined(values, fmt) -> str:
    return ", ".join(fmt(v) for v in values)


def count_text(value: float) -> str:
    return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 else f"{value:,.1f}"


def describe_slopes(segs: list[Segment], u: Units) -> str:
    """The per-sequence slopes step by step, and their trend."""
    if not segs:
        return ""
    slopes = [s.slope_per_seq for s in segs]
    listed = ", ".join(f"{u.main(s.slope_per_seq)} ({s.from_bs}\u2192{s.to_bs})" for s in segs)
    if len(slopes) > 1 and all(b < a for a, b in zip(slopes, slopes[1:])):
        trend = "falls at every step"
    elif len(slopes) > 1 and all(b > a for a, b in zip(slopes, slopes[1:])):
        trend = "rises at every step"
    elif _about_constant(slopes):
        trend = "stays about the same"
    else:
        trend = "changes from step to step"
    return f"Per added sequence the slope {trend}: {listed} per sequence."


def _about_constant(slopes) -> bool:
    top = max(abs(s) for s in slopes)
    return top == 0 or (max(slopes) - min(slopes)) <= MIN_RELATIVE_CHANGE * top


def _statistic(t: float) -> str:
    """A t value; beyond 10,000 (rounds that agree to the byte) as a power of ten."""
    return _number(t, False) if abs(t) < 1e4 else f"{t:.0e}".replace("-", "\u2212")


def breakpoint_words(b: Breakpoint, u: Units, name: str, fmt=None, same_as: str | None = None) -> str:
    fmt = fmt or u.main
    verb = "rises" if b.change_per_seq > 0 else "falls"
    stat = "" if b.statistic is None else f", t = {_statistic(b.statistic)}"
    verdict = ("a real change" if b.significant else
               "within noise or too small to count" if b.statistic is not None else
               "too few points to test")
    text = (f"At batch size {b.bs} the slope of {name} {verb} from {fmt(b.slope_before)} to "
            f"{fmt(b.slope_after)} per added sequence ({fmt(b.change_per_seq, True)} per sequence"
            f"{stat}, noise from {b.noise}): {verdict}")
    if b.significant and b.cause and same_as:
        text += f"; cause {b.cause}, as for {same_as}"
    elif b.significant and b.cause:
        text += f"; cause {b.cause}: {b.reason}"
    elif b.significant and b.reason:
        text += f"; {b.reason}"
    return text + "."


def params_number(params: float) -> str:
    """40e9 rather than 4e+10: the way model sizes are written."""
    for exp in (12, 9, 6):
        if params >= 10.0**exp:
            return f"{params / 10.0**exp:g}e{exp}"
    return f"{params:g}"


def params_words(params: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if params >= size:
            return f"{params / size:g}{suffix}"
    return f"{params:g}-parameter"


def dtype_words(dtype_bytes: float) -> str:
    return {0.5: "4-bit", 1.0: "8-bit", 2.0: "16-bit (FP16/BF16)", 4.0: "FP32"}.get(
        dtype_bytes, f"{dtype_bytes:g} bytes per parameter")


def at_batch_sizes(pairs, noun: str) -> str:
    """'48, 144 preemptions at batch sizes 32, 64'."""
    distinct = {count_text(v) for _, v in pairs}
    values = distinct.pop() if len(distinct) == 1 else ", ".join(count_text(v) for _, v in pairs)
    sizes = ", ".join(str(bs) for bs, _ in pairs)
    if values == "1":   # '1 preemption', '1 request waited'
        first, _, rest = noun.partition(" ")
        noun = " ".join(filter(None, [first.removesuffix("s"), rest]))
    return f"{values} {noun} at batch size{'s' if len(pairs) > 1 else ''} {sizes}"
