"""Prefix caching on and off, on the same workload, traced and compared.

    python examples/compare_prefix_caching.py OUT_DIR [--prompts 64] [--max-tokens 4]

Starts the embedded tiny model twice (a real ``vllm.LLM`` each time: prefix caching off,
then on), runs the same seeded workload through each under ``kvprof.trace()``, then
compares the two traces as ``kvprof compare OUT_DIR/caching-off.arrow
OUT_DIR/caching-on.arrow`` would (the first is the baseline). Every prompt of the
workload starts with its task kind's shared prefix, so with caching on the full KV
blocks of that prefix are served from the cache instead of computed again. Few output
tokens per request keep the time to first token mostly prefill work, the part caching
saves. Writes OUT_DIR/comparison.json and prints the report and a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import os

import kvprof
from kvprof.models.engine import make_llm
from kvprof.models.sweep_runner import shutdown
from kvprof.models.workload import make_workload


def traced_run(path: str, caching: bool, args) -> None:
    """One engine, one traced pass over the workload; the engine is stopped afterwards."""
    llm = make_llm(max_num_seqs=args.max_num_seqs, enforce_eager=True, enable_prefix_caching=caching)
    workload = make_workload(args.prompts, max_tokens=args.max_tokens, seed=0, length_scale=0.15)
    try:
        with kvprof.trace(llm, path, overwrite=True):
            llm.generate(workload.prompts(), workload.sampling_params(), use_tqdm=False)
    finally:
        shutdown(llm)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    paths = {label: os.path.join(args.out_dir, f"caching-{label}.arrow") for label in ("off", "on")}
    for label, path in paths.items():
        traced_run(path, caching=label == "on", args=args)

    from rich.console import Console
    from kvprof.analysis.compare import RunInput, compare
    from kvprof.report.compare_text import render
    from kvprof.report.json_report import clean

    runs = [RunInput(f"caching {label}", path, [kvprof.open_trace(path)])
            for label, path in paths.items()]
    comparison = compare(runs)
    with open(os.path.join(args.out_dir, "comparison.json"), "w") as f:
        json.dump(clean(comparison.to_dict()), f, indent=1)
    Console().print(render(comparison))
    hit = comparison.metric("prefix_hit_rate")
    print(f"prefix-hit rate {100 * hit.values[0]:.1f} % without caching, "
          f"{100 * hit.values[1]:.1f} % with; " + "; ".join(
              ttft_change(comparison.metric(f"ttft_{stat}_ms"), stat) for stat in ("mean", "p99")))


def ttft_change(metric, stat: str) -> str:
    verdict = "significant" if metric.significant[1] else "within noise"
    return (f"TTFT {stat} {metric.values[0]:,.1f} ms without, {metric.values[1]:,.1f} ms with "
            f"({100 * metric.change[1]['relative']:+.1f} %, {verdict})")

if __name__ == "__main__":
    main()
