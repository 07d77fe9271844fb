"""``kvprof export PATH --perfetto -o trace.json``: a timeline for ui.perfetto.dev."""
from __future__ import annotations

import sys

from kvprof.cli.analyze import parse_window
from kvprof.errors import TraceTargetError, UsageError

MIB = 2**20


class ExportCommand:
    """Write the trace as Chrome trace-event JSON (ui.perfetto.dev, chrome://tracing): a track
    per process, a slice per step with its composition, an async slice per request, counters,
    and py-spy's host stacks where they were sampled. The size is estimated before writing."""

    name = "export"
    help = "write a timeline of a trace for ui.perfetto.dev (Chrome trace-event JSON)"

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", help="trace file written by kvprof")
        parser.add_argument("--perfetto", action="store_true", required=True,
                            help="the Chrome trace-event JSON that Perfetto opens (the one format)")
        parser.add_argument("-o", "--output", metavar="OUT", help="JSON file to write")
        parser.add_argument("--window", metavar="START:END", type=parse_window,
                            help="only the steps starting in [START, END) seconds from the first step")
        parser.add_argument("--every", metavar="N", type=_positive, default=1,
                            help="only every N-th step (by step number)")
        parser.add_argument("--max-mb", type=float, default=1024.0,
                            help="refuse to write a file estimated larger than this (default 1024)")
        parser.add_argument("--estimate", action="store_true", help="print the size estimate only")

    def run(self, args) -> int:
        from kvprof.format.reader import read_trace
        from kvprof.report import perfetto

        if not args.output and not args.estimate:
            raise UsageError("give the output file with -o OUT (or --estimate)")
        trace = read_trace(args.path)
        for warning in trace.warnings:
            print(f"kvprof: warning: {warning}", file=sys.stderr)
        events = perfetto.events(trace, window=args.window, every=args.every)
        size = perfetto.estimate_bytes(events)
        print(f"kvprof: export: {len(events):,} events, about {size / MIB:,.1f} MiB", file=sys.stderr)
        if args.estimate:
            return 0
        if size > args.max_mb * MIB:
            raise UsageError(f"the export would be about {size / MIB:,.0f} MiB, over --max-mb "
                             f"{args.max_mb:g}: narrow it with --window START:END or --every N")
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                written = perfetto.write(events, out, {"trace": args.path,
                                                       "format_version": trace.format_version})
        except OSError as exc:
            raise TraceTargetError(f"cannot write {args.output}: {exc.strerror}") from None
        print(f"kvprof: wrote {args.output} ({written / MIB:,.1f} MiB); open it at https://ui.perfetto.dev",
              file=sys.stderr)
        return 0


def _positive(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
