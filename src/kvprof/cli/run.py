"""``kvprof run``: the synthetic coding workload on the embedded engine, traced and summarised."""
from __future__ import annotations

import os
import time


class RunCommand:
    """Start the embedded tiny vLLM engine, run the synthetic workload through
    kvprof.trace(), and print what was measured."""

    name = "run"
    help = "trace the synthetic workload on the embedded tiny model and print a summary"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--prompts", type=int, default=64)
        parser.add_argument("--max-tokens", type=int, default=32)
        parser.add_argument("--max-num-seqs", type=int, default=16)
        parser.add_argument("--length-scale", type=float, default=0.15,
                            help="scale of prompt lengths (1.0 = the study's, up to 2K tokens)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--trace", default="out/run.arrow", help="trace path (overwritten)")
        parser.add_argument("--verbose", action="store_true",
                            help="show what vLLM and torch print (default: kept in TRACE.log)")
        parser.add_argument("--py-spy", action="store_true",
                            help="also sample host stacks with py-spy (as KVPROF_PY_SPY=1)")

    def run(self, args) -> int:
        from rich.console import Console

        console = Console()
        from kvprof.cli.engine_output import engine_output, py_spy_environ
        from kvprof.format.reader import read_trace
        output = engine_output(args.trace + ".log", args.verbose, py_spy_environ(args.py_spy))
        with output.session():
            with Console(file=output.terminal_err).status(
                    f"starting the engine and tracing {args.prompts} requests"):
                summary, wall = run_traced(args)
        trace = read_trace(args.trace)
        from kvprof.analysis import analyze
        s = analyze(trace).to_dict()
        console.print(render(s, wall, args))
        return 0


def run_traced(args) -> tuple[dict, float]:
    import kvprof
    from kvprof.api import ensure_supported
    from kvprof.models.engine import make_llm
    from kvprof.models.workload import make_workload

    ensure_supported()
    os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
    llm = make_llm(max_num_seqs=args.max_num_seqs)
    workload = make_workload(args.prompts, max_tokens=args.max_tokens, seed=args.seed,
                             length_scale=args.length_scale)
    start = time.perf_counter()
    with kvprof.trace(llm, args.trace, overwrite=True) as handle:
        llm.generate(workload.prompts(), workload.sampling_params(), use_tqdm=False)
    wall = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()
    return handle.summary, wall


def render(s: dict, wall: float, args):
    from rich.table import Table

    table = Table(title=f"kvprof run — {s['requests']} requests, max_num_seqs={args.max_num_seqs}, "
                  f"trace {args.trace}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    lat = s["latency_ms"]
    rows = [
        ("steps", f"{s['steps']}"),
        ("duration (trace)", f"{s['duration_s']:.2f} s  (generate() wall {wall:.2f} s)"),
        ("input / output tokens", f"{s['tokens']['input']} / {s['tokens']['output']}"),
        ("output tokens/s", f"{s['throughput']['output_tokens_per_s']:.1f}"),
        ("TTFT mean / p99", f"{lat['ttft']['mean']:.1f} / {lat['ttft']['p99']:.1f} ms"),
        ("TPOT mean / p99", f"{lat['tpot']['mean']:.2f} / {lat['tpot']['p99']:.2f} ms"),
        ("end-to-end mean / p99", f"{lat['e2e']['mean']:.1f} / {lat['e2e']['p99']:.1f} ms"),
        ("running seqs mean / max", f"{s['batch']['mean_running']:.1f} / {s['batch']['max_running']}"),
        ("KV blocks peak / usable", f"{s['kv']['peak_blocks_used']} / {s['kv']['blocks_total']} "
                                    f"({s['kv']['bytes_per_block']} B per block)"),
        ("prefix-hit rate", f"{100 * s['kv']['prefix_hit_rate']:.1f} %"),
        ("preemptions", f"{s['kv']['preemptions']}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
