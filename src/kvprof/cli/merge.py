"""``kvprof merge SUMMARY...``: several traces' results added together without their rows."""
from __future__ import annotations


class MergeCommand:
    """Add up summaries written by 'kvprof analyze TRACE --summary OUT' (days, replicas):
    tokens, requests and traced time summed; latency percentiles exact while every part
    holds its values exactly, within 0.5 % (relative) once a part or the whole is folded."""

    name = "merge"
    help = "add up summaries of several traces (kvprof analyze --summary) without their rows"

    def add_arguments(self, parser) -> None:
        parser.add_argument("summaries", nargs="+", metavar="SUMMARY",
                            help="summary files written by kvprof analyze --summary")
        parser.add_argument("--json", action="store_true", help="print the JSON report")
        parser.add_argument("--summary", metavar="OUT", help="also write the merged summary")

    def run(self, args) -> int:
        from kvprof.analysis.summary import merged
        from kvprof.format.summary_file import read_summary, write_summary

        whole = merged([read_summary(path) for path in args.summaries])
        if args.summary:
            write_summary(whole, args.summary)
        if args.json:
            import json

            from kvprof.report.json_report import clean
            from kvprof.format.schema import SUMMARY_VERSION
            report = {"summary_version": SUMMARY_VERSION, **whole.to_dict()}
            print(json.dumps(clean(report), indent=2, allow_nan=False))
        else:
            from rich.console import Console

            from kvprof.report.merge_text import render
            Console().print(render(whole))
        return 0
