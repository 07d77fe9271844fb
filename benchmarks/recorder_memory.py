"""Is the recorder's memory bounded? Millions of synthetic steps through the real recorder.

    python benchmarks/recorder_memory.py [--steps 1000000] [--batch 64] [--sample-every 10000]

A scripted engine (no vLLM: stand-ins with the attributes the hooks read from
vLLM's Scheduler, SchedulerOutput, Request and KVCacheBlock) keeps ``--batch``
requests decoding; each request generates 16..256 tokens, then finishes and frees
its blocks, and a new one arrives, is prefilled and takes blocks. Every step goes
through the real EngineRecorder hooks in vLLM's order, with the real TraceSession,
TraceWriter and writer thread, into a real trace on disk. The process RSS is
sampled every ``--sample-every`` steps, with the recorder's own structures
(request index, tracked requests, writer queue). Design target: at most 64 MB
over the starting RSS, whatever the run length.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

BLOCK_SIZE = 16


# ------------------------------------------------ vLLM stand-ins (attributes the hooks read)
@dataclass
class Block:
    block_id: int
    ref_cnt: int = 1
    is_null: bool = False


class Pool:
    def __init__(self, num_gpu_blocks: int):
        self.num_gpu_blocks = num_gpu_blocks
        self.free = [Block(i, ref_cnt=0) for i in range(num_gpu_blocks - 1, 0, -1)]
        self.cached_block_hash_to_block: dict = {}

    def get_num_free_blocks(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[Block]:
        blocks = [self.free.pop() for _ in range(n)]
        for b in blocks:
            b.ref_cnt = 1
        return blocks

    def give_back(self, blocks: list[Block]) -> None:
        for b in blocks:
            b.ref_cnt = 0
        self.free.extend(reversed(blocks))


class Status:
    def __init__(self, name: str):
        self.name = name


RUNNING, FINISHED = Status("RUNNING"), Status("FINISHED_LENGTH_CAPPED")


class Request:
    def __init__(self, request_id: str, prompt: int, max_tokens: int):
        self.request_id = request_id
        self.arrival_time = time.time()
        self.prompt_token_ids = None
        self.num_prompt_tokens = prompt
        self.max_tokens = max_tokens
        self.num_output_tokens = 0
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.status = RUNNING
        self.blocks: list[Block] = []

    def get_finished_reason(self):
        return "length" if self.status is FINISHED else None


@dataclass
class NewRequestData:
    req_id: str
    block_ids: tuple
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_ids: list
    resumed_req_ids: set
    num_output_tokens: list
    num_computed_tokens: list
    new_block_ids: list


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict
    total_num_scheduled_tokens: int


class Scheduler:
    def __init__(self, num_gpu_blocks: int):
        self.kv_cache_manager = type("KVCacheManager", (), {})()
        self.kv_cache_manager.block_pool = Pool(num_gpu_blocks)
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.requests: dict[str, Request] = {}


# ------------------------------------------------------------------ the engine
class SyntheticEngine:
    """Drives one EngineRecorder through steps of a steady decode batch with turnover."""

    def __init__(self, path: str, batch: int = 64, seed: int = 0, options=None):
        from kvprof.hooks.engine import EngineRecorder, Options
        from kvprof.recorder.session import prepare_target

        prepare_target(path, overwrite=True)
        self.batch = batch
        self.rng = random.Random(seed)
        self.scheduler = Scheduler(num_gpu_blocks=batch * 48 + 64)
        self.pool = self.scheduler.kv_cache_manager.block_pool
        self.recorder = EngineRecorder(self.scheduler, path, options or Options(), {"synthetic": True})
        self.arrived = 0
        self.finished = 0
        self.steps = 0

    def _arrive(self) -> Request:
        req = Request(f"req-{self.arrived}-{self.rng.getrandbits(32):08x}",
                      prompt=self.rng.randint(32, 512), max_tokens=self.rng.randint(16, 256))
        self.arrived += 1
        self.scheduler.requests[req.request_id] = req
        self.scheduler.waiting.append(req)
        self.recorder.on_add_request(req)
        return req

    def _allocate(self, req: Request, n: int) -> list[int]:
        blocks = self.pool.take(n)
        self.recorder.after_get_new_blocks(blocks)
        req.blocks.extend(blocks)
        return [b.block_id for b in blocks]

    def step(self) -> None:
        """One engine step: add_request, schedule() (allocations), update_from_output() (frees)."""
        rec, sched = self.recorder, self.scheduler
        while len(sched.running) + len(sched.waiting) < self.batch:
            self._arrive()
        t0 = rec.before_schedule()
        new_reqs, nst = [], {}
        ids, outs, computed, new_blocks = [], [], [], []
        for req in sched.running:                       # decodes, in vLLM's fresh lists
            ids.append(req.request_id)
            outs.append(req.num_output_tokens)
            computed.append(req.num_computed_tokens)
            nst[req.request_id] = 1
            if req.num_computed_tokens % BLOCK_SIZE == 0:
                new_blocks.append((self._allocate(req, 1),))
            else:
                new_blocks.append(None)
        for req in sched.waiting:                       # prefills of the new arrivals
            blocks = self._allocate(req, -(-req.num_prompt_tokens // BLOCK_SIZE))
            new_reqs.append(NewRequestData(req.request_id, (blocks,), 0))
            nst[req.request_id] = req.num_prompt_tokens
        sched.running.extend(sched.waiting)
        sched.waiting.clear()
        so = SchedulerOutput(new_reqs, CachedRequestData(ids, set(), outs, computed, new_blocks),
                             nst, sum(nst.values()))
        rec.after_schedule(t0, so)
        t2 = rec.before_update()
        still = []
        for req in sched.running:
            req.num_computed_tokens += nst[req.request_id]
            req.num_output_tokens += 1
            if req.num_output_tokens >= req.max_tokens:
                self._finish(req)
            else:
                still.append(req)
        sched.running = still
        rec.after_update(t2, so)
        self.steps += 1

    def _finish(self, req: Request) -> None:
        """vLLM's _free_request, then KVCacheManager.free -> BlockPool.free_blocks."""
        rec = self.recorder
        req.status = FINISHED
        rec.on_free_request(req)
        del self.scheduler.requests[req.request_id]
        rec.before_free_request_blocks(req)
        free_before = self.pool.get_num_free_blocks()
        self.pool.give_back(req.blocks)
        rec.after_free_blocks(free_before, req.blocks)
        rec.current_req = -1
        req.blocks = []
        self.finished += 1

    def close(self) -> dict:
        return self.recorder.close()


# -------------------------------------------------------------------- measuring
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sample-every", type=int, default=10_000)
    p.add_argument("--dir", default=None, help="where the trace goes (default: a temporary folder)")
    p.add_argument("--stall-writer", action="store_true",
                   help="the writer's first write never returns (a hung disk): the queue's worst case")
    return p.parse_args()


def run(args, workdir: str) -> None:
    path = os.path.join(workdir, "memory.arrow")
    engine = SyntheticEngine(path, batch=args.batch)
    rec, writer = engine.recorder, engine.recorder.session.writer
    if args.stall_writer:
        import threading
        hung = threading.Event()
        writer.streams.write = lambda table, batch: hung.wait()
    for _ in range(1000):   # warm-up: first batches, NumPy/Arrow pools
        engine.step()
    start_rss, samples = rss_bytes(), []
    peak = {"req_index": 0, "req_track": 0, "queue": 0}
    t_start = time.perf_counter()
    print(f"{'steps':>9} {'rss MB':>8} {'req_index':>9} {'req_track':>9} {'queue':>5} "
          f"{'finished':>9} {'dropped':>8} {'steps/s':>8}", flush=True)
    for i in range(1, args.steps + 1):
        engine.step()
        if i % 1000 == 0:
            peak["req_index"] = max(peak["req_index"], len(rec.req_index))
            peak["req_track"] = max(peak["req_track"], len(rec.req_track))
            peak["queue"] = max(peak["queue"], writer._queue.qsize())
        if i % args.sample_every == 0 or i == args.steps:
            samples.append((i, rss_bytes()))
            if i % (args.sample_every * 10) == 0 or i == args.steps:
                print(f"{i:>9} {samples[-1][1] / 2**20:>8.1f} {len(rec.req_index):>9} "
                      f"{len(rec.req_track):>9} {writer._queue.qsize():>5} {engine.finished:>9} "
                      f"{sum(writer.stats.rows_dropped.values()):>8} "
                      f"{i / (time.perf_counter() - t_start):>8.0f}", flush=True)
    elapsed = time.perf_counter() - t_start
    if args.stall_writer:
        hung.set()
    end = engine.close()
    end_rss = rss_bytes()
    files = [path] + glob.glob(path + ".parts/*")
    size = sum(os.path.getsize(f) for f in files)
    half = [rss for step, rss in samples if step > args.steps // 2]
    growth = (samples[-1][1] - half[0]) / max(samples[-1][0] - args.steps // 2, 1) * 1e6 if half else 0.0
    print()
    print(f"steps {args.steps:,} (+1,000 warm-up) at batch {args.batch} in {elapsed:.0f} s "
          f"({args.steps / elapsed:,.0f} steps/s); requests arrived {engine.arrived:,}, "
          f"finished {engine.finished:,}")
    print(f"RSS start {start_rss / 2**20:.1f} MB, max {max(r for _, r in samples) / 2**20:.1f} MB "
          f"(+{(max(r for _, r in samples) - start_rss) / 2**20:.1f} MB), end of steps "
          f"{samples[-1][1] / 2**20:.1f} MB, after close {end_rss / 2**20:.1f} MB")
    print(f"RSS growth over the second half: {growth / 2**20:+.2f} MB per million steps")
    print(f"peaks: req_index {peak['req_index']}, req_track {peak['req_track']}, "
          f"writer queue {peak['queue']} of 64; after close req_index {len(rec.req_index)}")
    print(f"trace {size / 2**20:.1f} MB on disk ({len(files)} files); rows written "
          f"{end['rows_written']}; rows dropped {end['rows_dropped'] or 0}; "
          f"complete {end['complete']}")


def main() -> int:
    args = parse_args()
    if args.dir:
        run(args, args.dir)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            run(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
