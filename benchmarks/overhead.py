"""What tracing costs: hook time per step, throughput traced vs untraced, bytes per row.

    python benchmarks/overhead.py [--batch-sizes 8,32,64] [--pairs 12] [--max-tokens 64]

For each batch size one engine on the embedded tiny model runs the same workload
untraced and traced, alternated (ABBA) so that drift cancels; the throughput
ratio is reported with its 95% confidence interval. The hooks' own time comes
from the trace itself (``steps.hook_ns`` in the EngineCore, ``forward.hook_ns``
in the worker), measured at decode steps with the batch full.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--waves", type=int, default=2, help="prompts per run = waves x batch size")
    p.add_argument("--replay-only", action="store_true", help="only the hooks' replayed CPU cost")
    return p.parse_args()


def trace_bytes(path: str) -> tuple[int, int]:
    files = [path] + glob.glob(path + ".parts/*.arrow")
    rs = os.path.getsize(path + ".parts/request_steps.arrow")
    return sum(os.path.getsize(f) for f in files), rs


def run_batch_size(bs: int, args, workdir: str) -> dict:
    import kvprof
    from kvprof.models.engine import make_llm
    from kvprof.models.workload import make_workload

    llm = make_llm(max_num_seqs=bs, enforce_eager=True)
    workload = make_workload(bs * args.waves, max_tokens=args.max_tokens, seed=bs, length_scale=0.05)
    prompts, params = workload.prompts(), workload.sampling_params()
    tokens = len(prompts) * args.max_tokens

    def once(traced: bool, i: int) -> tuple[float, str | None]:
        llm.reset_prefix_cache()
        path = os.path.join(workdir, f"bs{bs}-{i}.arrow") if traced else None
        start = time.perf_counter()
        if traced:
            with kvprof.trace(llm, path, overwrite=True):
                llm.generate(prompts, params, use_tqdm=False)
        else:
            llm.generate(prompts, params, use_tqdm=False)
        return tokens / (time.perf_counter() - start), path

    once(False, -1)   # warm-up
    ratios, untraced_tps, last = [], [], None
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        result = {traced: once(traced, i) for traced in order}
        ratios.append(result[True][0] / result[False][0])
        untraced_tps.append(result[False][0])
        last = result[True][1]
    llm.llm_engine.engine_core.shutdown()
    return summarize(bs, ratios, untraced_tps, last)


def summarize(bs: int, ratios: list, untraced_tps: list, path: str) -> dict:
    import kvprof
    trace = kvprof.open_trace(path)
    steps = trace["steps"].to_pandas()
    fw = trace["forward"].to_pandas()
    full = steps[(steps.num_running == bs) & (steps.num_decode_reqs == bs)]
    engine_us = full.hook_ns.to_numpy() / 1e3
    worker_us = fw[fw.step.isin(full.step)].hook_ns.to_numpy() / 1e3
    total, rs_bytes = trace_bytes(path)
    ends = trace.end_records
    n_steps = max(1, len(steps))
    writer_us = sum(e.get("writer_build_ns", 0) for e in ends.values()) / n_steps / 1e3
    rows = trace["request_steps"].num_rows
    mean = statistics.fmean(ratios)
    half = 1.96 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    return {
        "batch_size": bs, "pairs": len(ratios), "untraced_tok_s": statistics.fmean(untraced_tps),
        "throughput_ratio": mean, "ratio_ci95": half,
        "engine_hook_us_p50": float(np.percentile(engine_us, 50)) if engine_us.size else float("nan"),
        "engine_hook_us_p99": float(np.percentile(engine_us, 99)) if engine_us.size else float("nan"),
        "worker_hook_us_p50": float(np.percentile(worker_us, 50)) if worker_us.size else float("nan"),
        "worker_hook_us_p99": float(np.percentile(worker_us, 99)) if worker_us.size else float("nan"),
        "step_ms_p50": float(np.median((full.t_update_end_ns - full.t_schedule_start_ns) / 1e6))
        if len(full) else float("nan"),
        "full_steps": len(full), "writer_us_per_step": writer_us,
        "bytes_per_request_step": rs_bytes / rows, "trace_bytes_per_request_step": total / rows,
    }


def replay_hook_cost(bs: int, workdir: str, steps: int = 3000) -> dict:
    """The hooks' CPU cost without the engine around them: vLLM's own SchedulerOutput
    objects for a full decode batch of ``bs``, fed to the real recorders.

    In the engine the same hooks also wait for the GIL held by vLLM's I/O threads and
    kvprof's writer; this replay measures only kvprof's own work."""
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    from kvprof.hooks.engine import EngineRecorder, Options
    from kvprof.hooks.worker import WorkerRecorder
    from kvprof.recorder.session import prepare_target

    class Pool:
        num_gpu_blocks, cached_block_hash_to_block = 10_000, {}

        def get_num_free_blocks(self):
            return 5_000

    class Scheduler:
        kv_cache_manager = type("KVM", (), {"block_pool": Pool()})()
        running, waiting, requests = list(range(bs)), [], {}

    path = os.path.join(workdir, f"replay-{bs}.arrow")
    prepare_target(path, overwrite=True)
    engine = EngineRecorder(Scheduler(), path, Options(), {})
    worker = WorkerRecorder(type("W", (), {"rpc_rank": 0})(), path, {})
    ids = [f"{i}-abcdef12" for i in range(bs)]
    for rid in ids:
        engine.index_of(rid)

    def output():
        cached = CachedRequestData(req_ids=ids, resumed_req_ids=set(), new_token_ids=[],
                                   all_token_ids={}, new_block_ids=[None] * bs,
                                   num_computed_tokens=[300] * bs, num_output_tokens=[20] * bs)
        return SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                               num_scheduled_tokens=dict.fromkeys(ids, 1), total_num_scheduled_tokens=bs,
                               scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                               finished_req_ids=set(), free_encoder_mm_hashes=[])

    engine_ns, worker_ns = [], []
    for _ in range(steps):
        so = output()
        t = time.perf_counter_ns()
        t0 = engine.before_schedule()
        so.kvprof_step = engine.next_step
        engine.after_schedule(t0, so)
        engine.after_update(engine.before_update(), so)
        t1 = time.perf_counter_ns()
        worker.after_forward(worker.before_forward(so))
        engine_ns.append(t1 - t)
        worker_ns.append(time.perf_counter_ns() - t1)
    end = engine.close()
    worker_end = worker.close()
    build = (end.get("writer_build_ns", 0) + worker_end.get("writer_build_ns", 0)) / steps / 1e3
    return {"engine_us_p50": float(np.percentile(engine_ns, 50)) / 1e3,
            "engine_us_p99": float(np.percentile(engine_ns, 99)) / 1e3,
            "worker_us_p50": float(np.percentile(worker_ns, 50)) / 1e3,
            "worker_us_p99": float(np.percentile(worker_ns, 99)) / 1e3,
            "writer_us_per_step": build}


def main() -> None:
    args = parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        replays = {bs: replay_hook_cost(bs, workdir) for bs in sizes}
        for bs in ([] if args.replay_only else sizes):
            results.append(run_batch_size(bs, args, workdir))
    print()
    print("hooks' own CPU time per step, replayed outside the engine (us):")
    print(f"{'bs':>4} {'engine p50/p99':>16} {'worker p50/p99':>16} {'writer thread':>14}")
    for bs, r in replays.items():
        print(f"{bs:>4} {r['engine_us_p50']:>8.1f}/{r['engine_us_p99']:<7.1f} "
              f"{r['worker_us_p50']:>8.1f}/{r['worker_us_p99']:<7.1f} {r['writer_us_per_step']:>14.1f}")
    if not results:
        return
    print()
    print("in the engine (hook times are wall clock and include waits for the GIL):")
    print(f"{'bs':>4} {'untraced tok/s':>15} {'traced/untraced':>17} {'engine hook us p50/p99':>24} "
          f"{'worker hook us p50/p99':>24} {'writer us/step':>14} {'step ms':>8} {'B/row':>6} {'all B/row':>9}")
    for r in results:
        print(f"{r['batch_size']:>4} {r['untraced_tok_s']:>15.0f} "
              f"{r['throughput_ratio']:>10.4f}±{r['ratio_ci95']:.4f} "
              f"{r['engine_hook_us_p50']:>13.1f}/{r['engine_hook_us_p99']:<10.1f} "
              f"{r['worker_hook_us_p50']:>13.1f}/{r['worker_hook_us_p99']:<10.1f} "
              f"{r['writer_us_per_step']:>14.1f} "
              f"{r['step_ms_p50']:>8.2f} {r['bytes_per_request_step']:>6.2f} "
              f"{r['trace_bytes_per_request_step']:>9.2f}")
    top = results[-1]
    rep = replays[top["batch_size"]]
    print(f"overhead: throughput {100 * (1 - top['throughput_ratio']):+.2f}% "
          f"(±{100 * top['ratio_ci95']:.2f}) at bs={top['batch_size']}; hook time "
          f"{rep['engine_us_p50'] + rep['worker_us_p50']:.1f} us/step replayed (engine+worker p50; "
          f"{top['engine_hook_us_p50'] + top['worker_hook_us_p50']:.1f} in the engine) "
          f"+ {rep['writer_us_per_step']:.1f} us/step on writer threads; "
          f"{top['bytes_per_request_step']:.2f} bytes per request-step row")


if __name__ == "__main__":
    main()
