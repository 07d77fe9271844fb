"""AsyncLLM under load with aborts, traced: does the writer keep up, what does kvprof cost?

    python benchmarks/async_load.py [--requests 1000] [--max-num-seqs 64] [--abort-every 7]

Prints the figures (no assertion): wall time, steps, requests and aborts in the trace
against what the clients saw, aborts vLLM took during a forward, rows dropped by the
writer, the writer thread's build time and kvprof's own time in the EngineCore hooks.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from pathlib import Path

import kvprof
from kvprof.models.engine import engine_kwargs
from kvprof.models.workload import make_workload


async def drive(args, path: Path) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        **engine_kwargs(max_num_seqs=args.max_num_seqs, enforce_eager=True)))
    wl = make_workload(args.requests, max_tokens=args.max_tokens, seed=1, length_scale=0.1)
    params = wl.sampling_params()

    async def one(i, prompt):
        rid, seen = f"r-{i}", 0
        gen = engine.generate(prompt, params, request_id=rid)
        async for out in gen:
            seen = len(out.outputs[0].token_ids)
            if args.abort_every and i % args.abort_every == 0 and seen >= args.abort_after:
                await gen.aclose()
                return True
        return False

    try:
        start = time.perf_counter()
        async with kvprof.trace(engine, path, overwrite=True) as handle:
            aborted = await asyncio.gather(*(one(i, p) for i, p in enumerate(wl.prompts())))
        wall = time.perf_counter() - start
    finally:
        engine.shutdown()
        del engine
    return {"wall_s": wall, "aborted": sum(aborted), "summary": handle.summary}


def report(args, result: dict, path: Path) -> None:
    trace = kvprof.open_trace(path)
    st = trace["steps"].to_pandas()
    req = trace["requests"].to_pandas()
    rs = trace["request_steps"].to_pandas()
    aborted = req[req.finish_reason == "abort"]
    last = rs.groupby("req").step.max().reindex(aborted.req).to_numpy()
    mid_forward = int((aborted.finish_step.to_numpy() == last).sum())
    end = trace.end_records["engine_core"]
    print(f"requests {args.requests} (trace {len(req)}), max_num_seqs {args.max_num_seqs}, "
          f"max_tokens {args.max_tokens}")
    print(f"wall {result['wall_s']:.1f} s, steps {len(st)}, "
          f"output tokens {int(req.output_tokens.sum())}")
    print(f"aborted by clients {result['aborted']}, 'abort' rows in trace {len(aborted)}, "
          f"taken during a forward {mid_forward}")
    print(f"rows dropped {trace.rows_dropped or 0}, complete {trace.complete}, "
          f"steps contiguous {bool((st.step.diff().dropna() == 1).all())}")
    hook_us = st.hook_ns / 1e3
    size = sum(f.stat().st_size for f in [path, *Path(str(path) + ".parts").iterdir()])
    print(f"writer build {end['writer_build_ns'] / 1e6:.1f} ms; EngineCore hooks "
          f"{hook_us.sum() / 1e3:.1f} ms in all, per step median {hook_us.median():.0f} us, "
          f"p90 {hook_us.quantile(0.9):.0f} us, max {hook_us.max():.0f} us; "
          f"step median {(st.t_update_end_ns - st.t_schedule_start_ns).median() / 1e6:.1f} ms; "
          f"trace files {size / 1e6:.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--abort-every", type=int, default=7)
    parser.add_argument("--abort-after", type=int, default=3)
    parser.add_argument("--trace", default=None)
    args = parser.parse_args()
    path = Path(args.trace or Path(tempfile.mkdtemp()) / "async_load.arrow")
    result = asyncio.run(drive(args, path))
    gc.collect()   # the engine's reference cycles: collected now, not at interpreter exit
    report(args, result, path)


if __name__ == "__main__":
    main()
