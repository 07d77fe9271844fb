"""Trace a real vLLM engine (the embedded tiny model) and print what the trace holds.

    python examples/trace_llm.py trace.arrow [--prompts 32] [--max-tokens 32]

Run without a path (and with KVPROF_TRACE=trace.arrow in the environment) it
shows the no-code-change route: the plugin records from engine start to shutdown.
"""
from __future__ import annotations

import argparse
import os

import kvprof
from kvprof.models.engine import make_llm
from kvprof.models.workload import make_workload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", nargs="?")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--print-pid", action="store_true", help="print the EngineCore pid")
    args = parser.parse_args()

    llm = make_llm(max_num_seqs=args.max_num_seqs, enforce_eager=True)
    workload = make_workload(args.prompts, max_tokens=args.max_tokens, seed=0, length_scale=0.15)
    if args.path is None:
        outputs = llm.generate(workload.prompts(), workload.sampling_params(), use_tqdm=False)
        print(f"generated {sum(len(o.outputs[0].token_ids) for o in outputs)} tokens "
              f"(KVPROF_TRACE={os.environ.get('KVPROF_TRACE')})")
        return
    with kvprof.trace(llm, args.path, overwrite=True) as handle:
        if args.print_pid:
            print(f"ENGINE_CORE_PID {handle.status()['pid']}", flush=True)
        llm.generate(workload.prompts(), workload.sampling_params(), use_tqdm=False)
    trace = kvprof.open_trace(args.path)
    print(f"{args.path}: {trace['steps'].num_rows} steps, {trace['requests'].num_rows} requests, "
          f"{trace['request_steps'].num_rows} request-steps, complete={trace.complete}")


if __name__ == "__main__":
    main()
