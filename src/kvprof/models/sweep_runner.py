"""Run the batch-size study: one engine per batch size (or per round), one trace per round.

Each batch size gets its own engine with ``max_num_seqs`` set to it, and a
closed-loop client that keeps exactly that many requests in flight (a new
request enters as soon as one finishes), as a benchmark client with that
concurrency would. End-to-end latency then measures service time at that batch
size rather than the wait behind a long queue. The prefix cache is reset between
rounds so that every round does the same work.

With ``engine_per_round`` every round starts a fresh engine and the rounds are
interleaved (round 0 of every batch size, then round 1, ...), the order rotated by
one batch size each round so that no size always follows the same one: the same
setting's rounds then see different engines and different spells of the machine,
so rounds that agree show an effect of the setting, and rounds that disagree show
noise.

Recording side only: this module never imports the analyzer.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from kvprof.models.workload import Workload, make_workload


@dataclass(frozen=True)
class SweepPlan:
    """What to run; the defaults are the scaled-down study that fits 2 CPU cores."""

    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    prompts: int = 96
    max_tokens: int = 32
    rounds: int = 2
    length_scale: float = 0.15
    seed: int = 0
    out_dir: str = "out/sweep"
    model: str | None = None            # None: the embedded tiny model
    kv_blocks: int | None = None        # cap the KV pool (None: vLLM's default budget)
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    engine_per_round: bool = False      # a fresh engine per round, rounds interleaved

    def schedule(self) -> list[tuple[int, tuple[int, ...]]]:
        """(batch size, its rounds) per engine, in the order the engines run."""
        if not self.engine_per_round:
            return [(b, tuple(range(self.rounds))) for b in self.batch_sizes]
        sizes = list(self.batch_sizes)
        return [(b, (r,)) for r in range(self.rounds)
                for b in sizes[r % len(sizes):] + sizes[:r % len(sizes)]]

    def trace_path(self, batch_size: int, round_index: int) -> str:
        return os.path.join(self.out_dir, f"bs{batch_size:03d}-r{round_index}.arrow")

    def workload(self) -> Workload:
        return make_workload(self.prompts, max_tokens=self.max_tokens, seed=self.seed,
                             length_scale=self.length_scale)


FULL_STUDY = dict(prompts=250, max_tokens=512, rounds=3, length_scale=1.0)


@dataclass
class RoundRecord:
    """One traced round: where its trace is and what the client saw."""

    batch_size: int
    round_index: int
    trace: str
    wall_s: float
    output_tokens: int
    engine: int = 0          # which engine of the sweep ran it (0, 1, ... in start order)


@dataclass
class Progress:
    """Callbacks the CLI uses for progress bars; all optional."""

    engine_starting: Callable[[int], None] = lambda batch_size: None
    request_done: Callable[[int, int], None] = lambda batch_size, done: None
    round_done: Callable[[RoundRecord], None] = lambda record: None


def engine_for(plan: SweepPlan, batch_size: int):
    """A real ``vllm.LLM`` with ``max_num_seqs=batch_size`` (the embedded model by default)."""
    from kvprof.models.engine import engine_kwargs
    from vllm import LLM
    kwargs = engine_kwargs(max_num_seqs=batch_size, num_kv_blocks=plan.kv_blocks,
                           max_num_batched_tokens=plan.max_num_batched_tokens,
                           enforce_eager=plan.enforce_eager)
    if plan.model:
        kwargs.update(model=plan.model, load_format="auto", skip_tokenizer_init=True)
    return LLM(**kwargs)


def run_sweep(plan: SweepPlan, progress: Progress | None = None,
              on_error: Callable[[int, BaseException], None] | None = None) -> list[RoundRecord]:
    """Run every batch size of ``plan``; traces go to ``plan.out_dir`` (overwritten)."""
    progress = progress or Progress()
    os.makedirs(plan.out_dir, exist_ok=True)
    workload = plan.workload()
    records = []
    for engine, (batch_size, rounds) in enumerate(plan.schedule()):
        progress.engine_starting(batch_size)
        llm = engine_for(plan, batch_size)
        try:
            for round_index in rounds:
                record = run_round(llm, plan, workload, batch_size, round_index, progress)
                record.engine = engine
                records.append(record)
                progress.round_done(record)
        finally:
            shutdown(llm)
    return records


def run_round(llm, plan: SweepPlan, workload: Workload, batch_size: int, round_index: int,
              progress: Progress) -> RoundRecord:
    import kvprof
    llm.reset_prefix_cache()
    path = plan.trace_path(batch_size, round_index)
    start = time.perf_counter()
    with kvprof.trace(llm, path, overwrite=True):
        tokens = closed_loop(llm.llm_engine, workload, batch_size,
                             lambda done: progress.request_done(batch_size, done))
    return RoundRecord(batch_size, round_index, path, time.perf_counter() - start, tokens)


def closed_loop(engine, workload: Workload, concurrency: int,
                on_done: Callable[[int], None] = lambda done: None) -> int:
    """Keep ``concurrency`` requests in flight until the workload is done; output tokens."""
    prompts, params = workload.prompts(), workload.sampling_params()
    next_index, done, output_tokens = 0, 0, 0
    while done < len(prompts):
        while next_index < len(prompts) and next_index - done < concurrency:
            engine.add_request(workload.requests[next_index].request_id, prompts[next_index], params)
            next_index += 1
        for out in engine.step():
            if out.finished:
                done += 1
                output_tokens += sum(len(c.token_ids) for c in out.outputs)
                on_done(done)
    return output_tokens


def shutdown(llm) -> None:
    """Stop the engine's processes before the next batch size starts its own."""
    import gc
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()
