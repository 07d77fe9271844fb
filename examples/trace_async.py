"""Trace an AsyncLLM serving concurrent requests: ``async with kvprof.trace(engine, path)``.

    python examples/trace_async.py trace.arrow [--requests 48] [--data-parallel-size 2]

With data parallelism every replica's EngineCore writes its own trace beside the path
(``trace.dp0.arrow``, ``trace.dp1.arrow``); ``kvprof analyze trace.arrow`` reads them as
one deployment. (On vLLM's CPU backend, two replicas need VLLM_CPU_OMP_THREADS_BIND="0|1".)
"""
from __future__ import annotations

import argparse
import asyncio

import kvprof
from kvprof.models.engine import engine_kwargs
from kvprof.models.workload import make_workload


async def serve(path: str, n: int, max_tokens: int, data_parallel_size: int) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = engine_kwargs(max_num_seqs=16, enforce_eager=True, data_parallel_size=data_parallel_size)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    workload = make_workload(n, max_tokens=max_tokens, seed=0, length_scale=0.15)
    params = workload.sampling_params()

    async def one(i, prompt):
        final = None
        async for out in engine.generate(prompt, params, request_id=f"req-{i}"):
            final = out
        return len(final.outputs[0].token_ids)

    try:
        async with kvprof.trace(engine, path, overwrite=True) as handle:
            counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(workload.prompts())))
    finally:
        engine.shutdown()
        del engine   # not left for interpreter teardown, where vLLM's __del__ complains
    written = [r["path"] for r in handle.started.get("replicas", [handle.started])]
    print(f"{path}: {len(counts)} requests, {sum(counts)} tokens")
    for trace_path in written:
        trace = kvprof.open_trace(trace_path)
        print(f"{trace_path}: {trace['steps'].num_rows} steps and "
              f"{trace['requests'].num_rows} requests")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(serve(args.path, args.requests, args.max_tokens, args.data_parallel_size))


if __name__ == "__main__":
    main()
