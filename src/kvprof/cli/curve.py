"""``kvprof curve POINTS.csv``: the memory-curve analysis on (batch size, memory) points
measured elsewhere (nvidia-smi, a published table)."""
from __future__ import annotations

import argparse
import csv
import json
import math

from kvprof.errors import TraceFormatError, UsageError

MEMORY_COLUMNS = {"memory_bytes": 1.0, "memory_mib": 2.0**20, "memory_gb": 1e9}
UNIT_WORDS = {"memory_bytes": None, "memory_mib": "MiB", "memory_gb": "GB"}


def positive_float(text: str) -> float:
    """'40e9' -> 40e9; a finite number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class CurveCommand:
    """Fit memory against batch size from a CSV of points: slopes per added sequence,
    breakpoints with a test of whether each is real, and what the curve says (and cannot say).

    The CSV has a header row with batch_size and one of memory_bytes, memory_mib
    (2**20 bytes) or memory_gb (1e9 bytes); other columns are ignored. Rows that repeat a
    batch size are rounds: their spread is the noise the breakpoint test uses."""

    name = "curve"
    help = "memory versus batch size from a CSV of points: per-sequence slopes, breakpoints"

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", help="CSV: batch_size and one of memory_bytes, memory_mib "
                            "(MiB = 2**20 bytes), memory_gb (GB = 1e9 bytes)")
        parser.add_argument("--params", type=positive_float, metavar="N",
                            help="the model's parameter count (e.g. 40e9), for a weights check")
        parser.add_argument("--dtype-bytes", type=positive_float, metavar="B",
                            help="bytes per parameter (2 for FP16/BF16), with --params")
        parser.add_argument("--output-tokens", type=positive_float, metavar="N",
                            help="output tokens per request, to read a latency_ms column as "
                                 "time per output token (latency / N)")
        parser.add_argument("--json", action="store_true", help="print the JSON report")

    def run(self, args) -> int:
        from kvprof.analysis.curve import explain_points

        if (args.params is None) != (args.dtype_bytes is None):
            raise UsageError("--params and --dtype-bytes go together (see 'kvprof curve --help')")
        batch_sizes, values, column = read_points(args.path)
        report = explain_points(batch_sizes, values, params=args.params,
                                dtype_bytes=args.dtype_bytes, unit=UNIT_WORDS[column])
        result = report.to_dict()
        result["source"] = {"path": args.path, "column": column}
        performance = read_performance(args.path)
        if performance:
            from kvprof.analysis.curve_perf import explain_performance
            result["performance"] = explain_performance(
                *performance, int(args.output_tokens) if args.output_tokens else None)
        if args.json:
            from kvprof.report.json_report import clean
            print(json.dumps(clean(result), indent=2, allow_nan=False))
        else:
            from rich.console import Console
            from kvprof.report.curve_text import render_curve
            Console().print(render_curve(result))
        return 0


def read_points(path: str) -> tuple[list[int], list[float], str]:
    """(batch sizes, bytes, memory column) from the CSV; one row per reading."""
    rows = _rows(path)
    header = [h.strip().lower() for h in rows[0]]
    if "batch_size" not in header:
        raise TraceFormatError(f"{path}: no header row with a batch_size column "
                               f"(first row: {','.join(rows[0])[:80]})")
    present = [c for c in MEMORY_COLUMNS if c in header]
    if len(present) != 1:
        what = "no" if not present else "more than one"
        raise TraceFormatError(f"{path}: {what} memory column; give exactly one of "
                               f"{', '.join(MEMORY_COLUMNS)}")
    column = present[0]
    bs_at, mem_at = header.index("batch_size"), header.index(column)
    batch_sizes, values = [], []
    for line, row in rows[1:]:
        bs = _number(path, line, row, bs_at, "batch_size")
        if bs <= 0 or bs != int(bs):
            raise TraceFormatError(f"{path}: line {line}: batch_size must be a positive whole "
                                   f"number, got {row[bs_at].strip()!r}")
        memory = _number(path, line, row, mem_at, column)
        if memory < 0:
            raise TraceFormatError(f"{path}: line {line}: {column} is negative ({row[mem_at].strip()})")
        batch_sizes.append(int(bs))
        values.append(memory * MEMORY_COLUMNS[column])
    distinct = len(set(batch_sizes))
    if distinct < 3:
        raise TraceFormatError(f"{path}: {distinct} distinct batch size{'s' if distinct != 1 else ''}"
                               f"; at least 3 are needed to fit a curve")
    return batch_sizes, values, column


PERF_COLUMNS = {"output_tokens_per_s": ("output_tokens_per_s", "output_tok_s"),
                "latency_ms": ("latency_ms", "mean_latency_ms", "mean_e2e_ms")}


def read_performance(path: str) -> tuple[list[int], list, list] | None:
    """(batch sizes, output tokens/s, mean latency ms) when the CSV has either column;
    an empty cell is a value not given."""
    rows = _rows(path)
    header = [h.strip().lower() for h in rows[0]]
    at = {key: next((header.index(n) for n in names if n in header), None)
          for key, names in PERF_COLUMNS.items()}
    if all(i is None for i in at.values()):
        return None
    bs_at = header.index("batch_size")
    sizes, columns = [], {key: [] for key in at}
    for line, row in rows[1:]:
        sizes.append(int(_number(path, line, row, bs_at, "batch_size")))
        for key, i in at.items():
            given = i is not None and i < len(row) and row[i].strip()
            value = _number(path, line, row, i, header[i]) if given else None
            if value is not None and value <= 0:
                raise TraceFormatError(f"{path}: line {line}: {header[i]} must be positive")
            columns[key].append(value)
    return sizes, columns["output_tokens_per_s"], columns["latency_ms"]


def _rows(path: str) -> list:
    """The header row, then (line number, row) for each non-blank, non-comment row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = [(i, row) for i, row in enumerate(csv.reader(f), 1)
                     if any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#")]
    except FileNotFoundError:
        raise TraceFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceFormatError(f"{path}: is a folder, not a CSV file") from None
    except UnicodeDecodeError:
        raise TraceFormatError(f"{path}: not a text CSV file (not UTF-8)") from None
    except (OSError, csv.Error) as exc:
        raise TraceFormatError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if not lines:
        raise TraceFormatError(f"{path}: empty file (expected a header row and points)")
    return [lines[0][1], *lines[1:]]


def _number(path: str, line: int, row: list, at: int, name: str) -> float:
    text = row[at].strip() if at < len(row) else ""
    try:
        value = float(text)
    except ValueError:
        what = f"not a number ({text[:40]!r})" if text else "empty"
        raise TraceFormatError(f"{path}: line {line}: {name} is {what}") from None
    if not math.isfinite(value):
        raise TraceFormatError(f"{path}: line {line}: {name} is not finite ({text})")
    return value
