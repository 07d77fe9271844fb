"""``kvprof sweep``: the batch-size study, traced, with its memory curve explained."""
from __future__ import annotations

import csv
import json
import os
import sys

from kvprof.cli.engine_output import engine_output, py_spy_environ
from kvprof.errors import KvprofError, UsageError

MANIFEST = "manifest.json"


class SweepCommand:
    """Run one engine per batch size (max_num_seqs = batch size) with a closed-loop
    client of that concurrency, trace every round, and report the study's tables
    (throughput, latency, peak memory) and the memory curve with each change of
    slope explained per added sequence."""

    name = "sweep"
    help = "run the batch-size study on an engine, traced, and explain the memory curve"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--batch-sizes", type=batch_sizes, default=(1, 4, 8, 16, 32, 64),
                            help="comma-separated max_num_seqs values (default 1,4,8,16,32,64)")
        parser.add_argument("--model", help="model path (default: the embedded tiny model, "
                            "random weights)")
        parser.add_argument("--prompts", type=positive, help="prompts per round (default 96)")
        parser.add_argument("--max-tokens", type=positive, help="output tokens per request (default 32)")
        parser.add_argument("--rounds", type=positive, help="rounds per batch size (default 2)")
        parser.add_argument("--length-scale", type=float,
                            help="prompt-length scale (1.0 = the study's, up to 2K tokens; default 0.15)")
        parser.add_argument("--full", action="store_true",
                            help="the study's size: 250 prompts, 512 output tokens, 3 rounds, full lengths")
        parser.add_argument("--kv-blocks", type=positive,
                            help="cap the KV pool at this many blocks (provokes preemption)")
        parser.add_argument("--max-num-batched-tokens", type=positive)
        parser.add_argument("--engine-per-round", action="store_true",
                            help="start a fresh engine for every round and interleave the rounds "
                                 "across batch sizes, so that rounds tell a setting's effect "
                                 "from engine-to-engine noise (more engine starts)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--out", default="out/sweep", help="folder for traces and reports")
        parser.add_argument("--json", action="store_true", help="print the JSON report")
        parser.add_argument("--reanalyze", action="store_true",
                            help="do not run engines: report the sweep already in --out")
        parser.add_argument("--verbose", action="store_true",
                            help="show what vLLM and torch print (default: kept in OUT/engine.log)")
        parser.add_argument("--py-spy", action="store_true",
                            help="also sample host stacks with py-spy (as KVPROF_PY_SPY=1)")

    def run(self, args) -> int:
        if args.reanalyze:
            rounds, plan = load_manifest(args.out)
        else:
            plan = make_plan(args)
            output = engine_output(os.path.join(args.out, "engine.log"), args.verbose,
                                   py_spy_environ(args.py_spy))
            rounds = run_with_progress(plan, output, quiet=args.json)
            write_manifest(plan, rounds)
            plan = plan_dict(plan)
        report = analyse(rounds, plan)
        write_outputs(args.out, report)
        if args.json:
            json.dump(report.to_dict(), sys.stdout, indent=1)
            print()
        else:
            from rich.console import Console
            from kvprof.report.sweep_text import render
            Console().print(render(report))
        return 0


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--batch-sizes: '{text}' is not a comma-separated list of integers") from None
    if not sizes or sizes[0] < 1:
        raise UsageError(f"--batch-sizes: '{text}': batch sizes must be positive integers")
    return tuple(sizes)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"'{text}' is not an integer") from None
    if value < 1:
        raise UsageError(f"'{text}' must be at least 1")
    return value


def make_plan(args):
    from kvprof.models.sweep_runner import FULL_STUDY, SweepPlan
    chosen = dict(FULL_STUDY) if args.full else {}
    for name in ("prompts", "max_tokens", "rounds", "length_scale"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    return SweepPlan(batch_sizes=args.batch_sizes, seed=args.seed, out_dir=args.out,
                     model=args.model, kv_blocks=args.kv_blocks,
                     max_num_batched_tokens=args.max_num_batched_tokens,
                     engine_per_round=args.engine_per_round, **chosen)


def plan_dict(plan) -> dict:
    from dataclasses import asdict
    return asdict(plan)


def run_with_progress(plan, output, quiet: bool):
    """Run the sweep with a progress bar per batch size on the terminal's stderr, and
    what the engines print in ``output``'s log."""
    with output.session():
        from kvprof.api import ensure_supported
        ensure_supported()   # imports vLLM, which prints as it loads
        return _run_with_bars(plan, output.terminal_err, quiet)


def _run_with_bars(plan, terminal, quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from kvprof.models import sweep_runner as runner

    total = plan.prompts * plan.rounds
    columns = (TextColumn("[bold]bs={task.fields[bs]:>3}"), TextColumn("{task.description:<16}"),
               BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=terminal), disable=quiet) as bars:
        tasks = {bs: bars.add_task("waiting", total=total, bs=bs) for bs in plan.batch_sizes}
        finished_before = {bs: 0 for bs in plan.batch_sizes}

        def round_done(record):
            finished_before[record.batch_size] += plan.prompts
            if record.round_index == plan.rounds - 1:
                bars.update(tasks[record.batch_size], description="done")

        callbacks = runner.Progress(
            engine_starting=lambda bs: bars.update(tasks[bs], description="starting engine"),
            request_done=lambda bs, done: bars.update(
                tasks[bs], description="running", completed=finished_before[bs] + done),
            round_done=round_done)
        try:
            return runner.run_sweep(plan, callbacks)
        except KvprofError:
            raise
        except Exception as exc:   # an engine that cannot start is the user's config, said in one line
            raise SweepError(f"the sweep stopped: {type(exc).__name__}: {exc}") from exc


class SweepError(KvprofError):
    """An engine of the sweep failed to start or run."""

    engine_failure = True   # the engine's log says why: its last lines are shown


def write_manifest(plan, rounds) -> None:
    manifest = {"plan": plan_dict(plan),
                "rounds": [{"batch_size": r.batch_size, "round": r.round_index,
                            "trace": os.path.relpath(r.trace, plan.out_dir),   # the folder can move
                            "wall_s": r.wall_s, "output_tokens": r.output_tokens,
                            "engine": r.engine} for r in rounds]}
    with open(os.path.join(plan.out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def load_manifest(out_dir: str) -> tuple[list[tuple[int, int, str, int | None]], dict]:
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        rounds = [(int(r["batch_size"]), int(r["round"]), _trace_path(out_dir, str(r["trace"])),
                   None if r.get("engine") is None else int(r["engine"]))
                  for r in manifest["rounds"]]
    except FileNotFoundError:
        raise UsageError(f"--reanalyze: no sweep in {out_dir} ({MANIFEST} not found)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--reanalyze: {path} is not a kvprof sweep manifest ({exc})") from None
    return rounds, manifest.get("plan", {})


def _trace_path(out_dir: str, trace: str) -> str:
    """Manifests name traces relative to their folder (older ones: to the working folder)."""
    inside = os.path.join(out_dir, trace)
    return trace if not os.path.exists(inside) and os.path.exists(trace) else inside


def analyse(rounds, plan: dict):
    """Read every round's trace and build the sweep report."""
    from kvprof.analysis.sweep import measure_round, sweep_report
    from kvprof.format.reader import read_trace
    measures = []
    for item in rounds:
        bs, index, path, engine = (item.batch_size, item.round_index, item.trace, item.engine) \
            if hasattr(item, "trace") else item
        measures.append(measure_round(read_trace(path), bs, index, engine))
    return sweep_report(measures, plan)


def write_outputs(out_dir: str, report) -> None:
    """report.json, and points.csv that ``kvprof curve`` reads (total memory per round)."""
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    with open(os.path.join(out_dir, "points.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["batch_size", "round", "memory_bytes"])
        for run in report.runs:
            for r in run.rounds:
                if r.components.get("total") is not None:
                    writer.writerow([run.batch_size, r.round_index, int(r.components["total"])])
