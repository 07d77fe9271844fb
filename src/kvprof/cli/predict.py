"""``kvprof predict SOURCE... --batch-sizes 12,48``: the step-time model fitted on traces
(or on every trace of sweep folders) predicts other batch sizes for the sources' workload."""
from __future__ import annotations

import glob
import json
import os

from kvprof.cli.analyze import parse_batch_sizes
from kvprof.errors import UsageError


class PredictCommand:
    """Fit one step-time model (non-negative costs: fixed, per decode request, per prefill
    token, per context token) jointly on every step of the sources, and predict output
    tokens/s, step time, TPOT and mean end-to-end latency at other batch sizes, with a 95 %
    interval, whether each is extrapolated, and which cost dominates. SOURCE is a trace or a
    folder written by `kvprof sweep` (all its traces). The workload predicted is the first
    trace's requests, run as a closed loop of that many requests in flight."""

    name = "predict"
    help = "predict throughput and latency at other batch sizes from traces or sweep folders"

    def add_arguments(self, parser) -> None:
        parser.add_argument("sources", nargs="+", metavar="SOURCE",
                            help="trace files or sweep folders")
        parser.add_argument("--batch-sizes", type=parse_batch_sizes, required=True,
                            metavar="B[,B...]", help="batch sizes (max_num_seqs) to predict")
        parser.add_argument("--json", action="store_true", help="print the JSON report")

    def run(self, args) -> int:
        from kvprof.analysis.predict import source_from_trace
        from kvprof.analysis.sweep_model import joint_fit, predict_for
        from kvprof.format.reader import read_trace

        paths = trace_paths(args.sources)
        sources = [source_from_trace(read_trace(p, ("request_steps", "requests"))) for p in paths]
        f = joint_fit(sources)
        if f.coefficients is None:
            raise UsageError(f"too few steps to fit a model ({f.steps} in {len(paths)} trace(s))")
        predictions = [predict_for(f, sources[0], b) for b in args.batch_sizes]
        report = {"report_version": "1.0", "sources": paths,
                  "seen_batch_sizes": sorted({s.batch_size for s in sources}),
                  "model": f.to_dict(), "predictions": [p.to_dict() for p in predictions]}
        if args.json:
            from kvprof.report.json_report import clean
            print(json.dumps(clean(report), indent=2, allow_nan=False))
        else:
            from rich.console import Console, Group
            from kvprof.report.json_report import clean
            from kvprof.report.predict_text import costs_table, predictions_table
            report = clean(report)
            Console().print(Group(costs_table(report["model"]), predictions_table(
                report["predictions"], f"Predicted for the requests of {paths[0]} "
                                       f"(closed loop; fitted on {len(paths)} trace(s))")))
        return 0


def trace_paths(sources: list[str]) -> list[str]:
    """Each trace named, or every trace of a named folder (its sweep manifest when there is one)."""
    out = []
    for source in sources:
        if os.path.isdir(source):
            found = sweep_traces(source)
            if not found:
                raise UsageError(f"{source}: a folder without kvprof traces (*.arrow)")
            out += found
        elif os.path.exists(source):
            out.append(source)
        else:
            raise UsageError(f"{source}: no such trace or folder")
    return out


def sweep_traces(folder: str) -> list[str]:
    from kvprof.cli.sweep import MANIFEST, load_manifest
    if os.path.exists(os.path.join(folder, MANIFEST)):
        return [path for _, _, path, _ in load_manifest(folder)[0]]
    return sorted(glob.glob(os.path.join(folder, "*.arrow")))
