"""The worker hook's cost with and without the CUPTI collector.

    python benchmarks/collector_overhead.py [--device cpu|cuda] [--pairs 4] [--steps 120] [--json OUT]

Runs the worker harness (benchmarks/worker_harness.py: kvprof's real worker hooks on
a stand-in WorkerWrapperBase around a torch forward) with the collector on and off,
alternated (ABBA) so that drift cancels, and prints ratios: kvprof's own hook time
per step (``forward.hook_ns``), the wrapped call's wall time beyond the worker's own,
and on CUDA the step's wall and device time. On a CPU the collector cannot run (no
CUDA), so both arms take the same path; the Python side of its per-step bookkeeping
is measured apart, against a native stand-in whose calls do nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("worker_harness", os.path.join(HERE, "worker_harness.py"))
harness = sys.modules.setdefault("worker_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)


def arm(device: str, steps: int, collector: bool) -> dict:
    result = harness.run(device, steps, collector=collector)
    rows = [r for r in result["rows"] if r["step"] >= harness.WARMUP]
    measured = [m for m in result["measured"] if m["step"] >= harness.WARMUP]
    out = {"hook_ns": statistics.mean(r["hook_ns"] for r in rows),
           "wrapper_ns": statistics.mean(m["outer_ns"] - m["inner_ns"] for m in measured),
           "step_wall_ns": result["run_ns"] / result["steps"],
           "active": bool((result["collector"] or {}).get("active"))}
    device_ns = [r["device_ns"] for r in rows if r["device_ns"] is not None]
    if device_ns:
        out["device_ns"] = statistics.mean(device_ns)
    return out


class _Nothing:
    """The native module's calls as no-ops: what is left is the collector's Python side."""

    def start(self, **kwargs):
        pass

    def push(self, external_id):
        pass

    def pop(self):
        pass

    def flush(self, forced=False):
        pass

    def take(self, patience=2):
        return [], [], {}

    def stop(self):
        pass


def python_side_ns(steps: int = 20000) -> float:
    """Per step: the profiler check and the push / pop of the forward and the sampling call."""
    from kvprof.recorder.cupti import Collector
    collector = Collector(_Nothing(), "none")
    t = time.perf_counter_ns()
    for step in range(steps):
        for _ in range(2):   # execute_model and sample_tokens
            if collector.still_alone():
                collector.push(step + 1)
                collector.pop()
    return (time.perf_counter_ns() - t) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--json", help="write the figures here as JSON")
    args = p.parse_args()
    on, off = [], []
    arm(args.device, args.steps, True)   # a first run pays for imports and first calls: not counted
    for i in range(args.pairs):       # ABBA: on, off, off, on, ...
        order = (True, False) if i % 2 == 0 else (False, True)
        for collector in order:
            (on if collector else off).append(arm(args.device, args.steps, collector))
    figures = {"device": args.device, "pairs": args.pairs, "steps": args.steps,
               "collector_active": all(a["active"] for a in on),
               "python_side_ns_per_step": python_side_ns()}
    for key in ("hook_ns", "wrapper_ns", "step_wall_ns", "device_ns"):
        if all(key in a for a in on + off):
            a, b = statistics.mean(x[key] for x in on), statistics.mean(x[key] for x in off)
            figures[key] = {"with": a, "without": b, "ratio": a / b if b else None}
    print(f"worker hook with / without the CUPTI collector ({args.device}, {args.pairs} ABBA pairs of "
          f"{args.steps} steps; collector active: {figures['collector_active']})")
    for key in ("hook_ns", "wrapper_ns", "step_wall_ns", "device_ns"):
        if key in figures:
            f = figures[key]
            print(f"  {key:14s} {f['with'] / 1e3:10.2f} µs / {f['without'] / 1e3:10.2f} µs = {f['ratio']:.4f}")
    print(f"  collector's Python side per step (no-op native): {figures['python_side_ns_per_step'] / 1e3:.2f} µs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
