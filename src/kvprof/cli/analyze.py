"""``kvprof analyze PATH``: the terminal, JSON and HTML reports of a trace.

Nothing heavy is imported until the command runs (``kvprof --help`` and ``kvprof
info`` never load numba or matplotlib).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

from kvprof.errors import KvprofError, TraceTargetError, UsageError


def parse_window(text: str) -> tuple[float | None, float | None]:
    """'START:END' in seconds from the trace start; either side may be empty."""
    start, sep, end = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}")
    try:
        bounds = tuple(float(v) if v.strip() else None for v in (start, end))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}") from None
    if None not in bounds and bounds[0] >= bounds[1]:
        raise argparse.ArgumentTypeError(f"START must be before END, got {text!r}")
    return bounds


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'48,96' -> (48, 96); every size a positive integer."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 48,96, got {text!r}") from None
    if any(b <= 0 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


class AnalyzeCommand:
    """Rebuild throughput, latency, batch composition, KV occupancy, memory readings and a
    step-time model from a trace; print them, or write JSON / HTML."""

    name = "analyze"
    help = "throughput, latency, batch, KV and a step-time model from a trace"

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", help="trace file written by kvprof")
        parser.add_argument("--json", action="store_true", help="print the JSON report")
        parser.add_argument("--html", metavar="OUT", help="also write a self-contained HTML report")
        parser.add_argument("--window", metavar="START:END", type=parse_window,
                            help="only the steps starting in [START, END) seconds from the trace start")
        parser.add_argument("--predict", metavar="B[,B...]", type=parse_batch_sizes, default=(),
                            help="predict throughput at these batch sizes with the step-time model")
        parser.add_argument("--summary", metavar="OUT",
                            help="also write a summary that kvprof merge adds to others "
                                 "(per day, per replica) without the trace's rows")

    def run(self, args) -> int:
        from kvprof.format.reader import replica_traces

        replicas = [] if os.path.exists(args.path) else replica_traces(args.path)
        if replicas:
            return analyze_deployment(args, replicas)
        analysis = analyze_one(args.path, args)
        if args.html:
            write_html(analysis, args.html)
        if args.summary:
            write_summary_of([analysis], args.summary)
        if args.json:
            from kvprof.report.json_report import render
            print(render(analysis))
        else:
            from rich.console import Console
            from kvprof.report.text import render
            Console().print(render(analysis))
        return 0


def analyze_one(path: str, args, label: str = ""):
    """One trace read and analysed; what the reader noticed goes to stderr."""
    from kvprof.analysis import analyze

    trace = read_while_loading_kernels(path)
    try:
        analysis = analyze(trace, window=args.window, predict=args.predict)
    except KvprofError as exc:
        raise with_warnings(exc, trace.warnings) from None
    for warning in trace.warnings:
        print(f"kvprof: warning: {label}{warning}", file=sys.stderr)
    return analysis


def analyze_deployment(args, paths: list[str]) -> int:
    """``PATH`` named a data-parallel deployment: every replica's trace, then the whole."""
    from kvprof.analysis import REPORT_VERSION
    from kvprof.analysis.deployment import deployment

    if args.html:
        raise UsageError(f"--html takes one trace; {args.path} is a deployment of "
                         f"{len(paths)} replica traces (give one of {', '.join(paths)})")
    replicas = []
    for index, path in enumerate(paths):
        analysis = analyze_one(path, args, label=f"{os.path.basename(path)}: ")
        rank = (analysis.run.get("data_parallel") or {}).get("rank", index)
        replicas.append((int(rank), analysis))
    dep = deployment(replicas)
    if args.summary:
        write_summary_of([a for _, a in replicas], args.summary, dep.span_s)
    if args.json:
        import json

        from kvprof.report.json_report import clean
        report = {"report_version": REPORT_VERSION, "deployment": dep.to_dict(),
                  "replicas": [a.to_dict() for _, a in replicas]}
        print(json.dumps(clean(report), indent=2, allow_nan=False))
    else:
        from rich.console import Console
        from kvprof.report.deployment_text import render
        Console().print(render(args.path, dep))
    return 0


def with_warnings(exc: KvprofError, warnings: list[str]) -> KvprofError:
    """The error, with what the reader noticed (often its cause) on the same one line."""
    if not warnings:
        return exc
    return type(exc)(f"{exc} (reader: {'; '.join(warnings)})")


def read_while_loading_kernels(path: str):
    """Read the trace on a thread while numba loads the kernel here: both take about half a
    second on a large trace, and Arrow's reading releases the GIL. request_steps, the
    table that grows with every sequence of every step, stays on disk: the kernel reads
    it batch by batch (docs/analyses.md, "Memory")."""
    from concurrent.futures import ThreadPoolExecutor

    from kvprof.analysis import NEEDED_TABLES, STREAMED_TABLES, load_kernels
    from kvprof.format.reader import read_trace

    with ThreadPoolExecutor(max_workers=1) as pool:
        reading = pool.submit(read_trace, path, NEEDED_TABLES, STREAMED_TABLES)
        load_kernels()
        # numba's tens of thousands of long-lived objects leave the cyclic collector's
        # sight: every later collection, and the one at interpreter exit (~0.4 s), skip them.
        gc.freeze()
        return reading.result()


def write_summary_of(analyses: list, out: str, span_s: float | None = None) -> None:
    """The analyses' mergeable summary; replicas (``span_s``: the deployment's) run at once."""
    from kvprof.analysis.summary import merged, summary_of
    from kvprof.format.summary_file import write_summary

    parts = [summary_of(a) for a in analyses]
    write_summary(parts[0] if len(parts) == 1 else merged(parts, span_s), out)


def write_html(analysis, out: str) -> None:
    from kvprof.report.html import render
    write_text(out, render(analysis))


def write_text(out: str, page: str) -> None:
    """Write a report; a folder that is not there or not writable is one line, exit code 2."""
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise TraceTargetError(f"cannot write {out}: {exc.strerror}") from None
