"""What py-spy sampling costs, and where step time goes, on the embedded engine.

    python benchmarks/pyspy_cost.py [--batch-sizes 1,16,64] [--pairs 6] [--rate 100]

One engine (max_num_seqs = the largest batch size) runs, for each batch size, a
closed loop keeping that many requests in flight, traced without and with py-spy
sampling (``kvprof.trace(..., py_spy=True)``), alternated (ABBA) so that
drift cancels; the throughput ratio sampled / unsampled is printed with its spread.
The last sampled trace of each batch size gives the share of step time per part
of the engine (``kvprof analyze``'s host-time table) for the EngineCore and the worker.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--waves", type=int, default=2, help="prompts per run = waves x batch size")
    return p.parse_args()


def run_batch_size(llm, bs: int, args, workdir: str) -> dict:
    import kvprof
    from kvprof.models.sweep_runner import closed_loop
    from kvprof.models.workload import make_workload

    workload = make_workload(max(bs * args.waves, 8), max_tokens=args.max_tokens, seed=bs,
                             length_scale=0.05)

    def once(sampled: bool, i: int) -> tuple[float, str]:
        llm.reset_prefix_cache()
        path = os.path.join(workdir, f"bs{bs}-{'s' if sampled else 'n'}{i}.arrow")
        start = time.perf_counter()
        with kvprof.trace(llm, path, overwrite=True, py_spy=sampled):
            tokens = closed_loop(llm.llm_engine, workload, bs)
        return tokens / (time.perf_counter() - start), path

    once(False, -1)   # warm-up
    ratios, last = [], None
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        result = {sampled: once(sampled, i) for sampled in order}
        ratios.append(result[True][0] / result[False][0])
        last = result[True][1]
    return {"bs": bs, "ratios": ratios, "host": host_shares(last)}


def host_shares(path: str) -> dict:
    import kvprof
    from kvprof.analysis import analyze
    host = analyze(kvprof.open_trace(path)).host_time
    return {} if host is None else {name: p.to_dict() for name, p in host.processes.items()}


def main() -> None:
    args = parse_args()
    from kvprof.analysis.host import PARTS
    results = []
    from kvprof.models.engine import make_llm
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = make_llm(max_num_seqs=max(sizes), enforce_eager=True)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for bs in sizes:
                results.append(run_batch_size(llm, bs, args, workdir))
    finally:
        llm.llm_engine.engine_core.shutdown()
    print("\npy-spy sampling at its default rate (100/s), throughput sampled / unsampled:")
    for r in results:
        q = r["ratios"]
        spread = statistics.stdev(q) if len(q) > 1 else 0.0
        print(f"  batch {r['bs']:>3}: ratio {statistics.mean(q):.3f} (median {statistics.median(q):.3f}, "
              f"sd {spread:.3f}, {len(q)} pairs)")
    print("\nshare of step time by part (EngineCore: schedule start to update end; worker: forward):")
    print(f"  {'batch':>5} {'process':<12} {'sampled':>8} " + " ".join(f"{p:>16}" for p in PARTS))
    for r in results:
        for name, p in r["host"].items():
            print(f"  {r['bs']:>5} {name:<12} {100 * p['coverage']:>7.1f}% "
                  + " ".join(f"{100 * p['shares'][k]:>15.1f}%" for k in PARTS))


if __name__ == "__main__":
    main()
