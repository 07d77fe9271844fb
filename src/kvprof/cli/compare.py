"""``kvprof compare A B [C...]``: runs side by side, each difference against noise."""
from __future__ import annotations

import os

from kvprof.errors import KvprofError, UsageError


class CompareCommand:
    """Compare traces or sweep folders against the first: throughput, latency, batch
    composition, KV occupancy, prefix hits, preemptions, step-time model terms and memory
    components, each change with its size and whether it is more than run-to-run noise
    (the rounds of a sweep folder, else a seeded bootstrap); what differs in the engine
    configuration and vLLM version; a warning when the workloads differ."""

    name = "compare"
    help = "compare traces or sweep folders: what changed, and is it more than noise"

    def add_arguments(self, parser) -> None:
        parser.add_argument("paths", nargs="+", metavar="PATH",
                            help="traces, or folders written by 'kvprof sweep' (their rounds "
                                 "measure the noise); the first is the baseline")
        parser.add_argument("--labels", help="comma-separated names of the runs "
                            "(default: the file or folder names)")
        parser.add_argument("--batch-size", type=int, help="of sweep folders, the batch size to "
                            "compare (default: the largest one all of them ran)")
        parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
        parser.add_argument("--resamples", type=int, default=None,
                            help="bootstrap resamples (default 400)")
        parser.add_argument("--json", action="store_true", help="print the JSON report")
        parser.add_argument("--html", metavar="OUT", help="also write a self-contained HTML report")

    def run(self, args) -> int:
        from kvprof.analysis import load_kernels
        from kvprof.analysis.compare import RESAMPLES, compare

        if len(args.paths) < 2:
            raise UsageError("compare needs at least two traces or sweep folders")
        if args.resamples is not None and args.resamples < 20:
            raise UsageError(f"--resamples {args.resamples}: at least 20 are needed for a 95 % interval")
        load_kernels()
        runs, notes = load_runs(args.paths, labels(args.labels, args.paths), args.batch_size)
        comparison = compare(runs, seed=args.seed, resamples=args.resamples or RESAMPLES)
        comparison.warnings[:0] = notes
        if args.html:
            write(args.html, _html(comparison))
        if args.json:
            import json
            from kvprof.report.json_report import clean
            print(json.dumps(clean(comparison.to_dict()), indent=2, allow_nan=False))
        else:
            from rich.console import Console
            from kvprof.report.compare_text import render
            Console().print(render(comparison))
        return 0


def labels(text: str | None, paths: list[str]) -> list[str]:
    """The given labels, or each path's last name; made unique."""
    if text:
        names = [n.strip() for n in text.split(",")]
        if len(names) != len(paths) or len(set(names)) != len(names) or not all(names):
            raise UsageError(f"--labels: give {len(paths)} different names, got {text!r}")
        return names
    names = [os.path.basename(os.path.normpath(p)).removesuffix(".arrow") or p for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def load_runs(paths: list[str], names: list[str], batch_size: int | None):
    """A RunInput per path: a trace is one round; a sweep folder gives the rounds of one
    batch size. Also notes that say which batch size was chosen."""
    from kvprof.analysis.compare import RunInput
    from kvprof.cli.sweep import load_manifest
    from kvprof.format.reader import read_trace

    sweeps = {p: load_manifest(p)[0] for p in paths if os.path.isdir(p)}
    notes = []
    if sweeps:
        batch_size, note = _batch_size(sweeps, batch_size)
        notes += [note] if note else []
    runs = []
    for path, name in zip(paths, names):
        traces = ([t for bs, _, t, _ in sorted(sweeps[path], key=lambda r: r[:3]) if bs == batch_size]
                  if path in sweeps else [path])
        source = f"{path} (batch size {batch_size})" if path in sweeps else path
        try:
            runs.append(RunInput(name, source, [read_trace(t) for t in traces]))
        except KvprofError as exc:
            raise type(exc)(f"{name}: {exc}") from None
    return runs, notes


def _batch_size(sweeps: dict, chosen: int | None) -> tuple[int, str | None]:
    sizes = [{r[0] for r in rounds} for rounds in sweeps.values()]
    common = set.intersection(*sizes)
    if chosen is not None:
        if chosen not in common:
            raise UsageError(f"--batch-size {chosen}: not run by every sweep folder "
                             f"(common sizes: {sorted(common) or 'none'})")
        return chosen, None
    if not common:
        raise UsageError("the sweep folders share no batch size; nothing to compare")
    if all(len(s) == 1 for s in sizes):
        return max(common), None
    return max(common), (f"sweep folders: comparing batch size {max(common)} (the largest all ran; "
                         f"--batch-size picks another of {sorted(common)})")


def _html(comparison) -> str:
    from kvprof.report.compare_html import render
    return render(comparison)


def write(out: str, page: str) -> None:
    from kvprof.cli.analyze import write_text
    write_text(out, page)
