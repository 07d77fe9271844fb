"""Synthetic traces with known answers, written through kvprof's own TraceSession.

A tiny step-by-step scheduler (FIFO admission, a token budget with chunked prefill,
scripted preemptions, recompute on resume) produces the rows a real engine would
record, plus the ground truth the analyzer must rebuild: every token's emission
time, each request's first token and finish. Step times follow a known linear
model of the step's composition, so the step-time fit has exact coefficients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from kvprof.format import schema as S
from kvprof.recorder.session import TraceSession, parts_dir, prepare_target

T0_NS = 1_000_000_000_000
GAP_NS = 50_000                 # between one step's update end and the next schedule start


@dataclass
class Spec:
    """One request: its prompt, how many tokens it generates, when it arrives."""

    prompt: int
    output: int
    arrival_step: int = 0
    cached: int = 0                     # prefix-cache hit at admission
    preempt_at: tuple[int, ...] = ()    # steps at whose start it is preempted (if running)


@dataclass
class Engine:
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 512
    block_size: int = 16
    usable_blocks: int = 1000
    bytes_per_block: int = 4096
    model_ns: tuple[float, float, float, float] = (2e6, 50e3, 4e3, 100.0)
    max_steps: int = 10_000


@dataclass
class _Req:
    idx: int
    spec: Spec
    computed: int = 0
    emitted: int = 0
    scheduled_before: bool = False
    resumed: bool = False
    recomputing: bool = False           # resumed, recomputation not finished yet
    blocks: int = 0
    first_scheduled_ns: int = -1
    first_scheduled_step: int = -1
    first_token_ns: int = -1
    first_token_step: int = -1
    finish_ns: int = -1
    finish_step: int = -1
    preemptions: int = 0
    emissions: list = field(default_factory=list)   # (step, t_ns) of every token


@dataclass
class Truth:
    """What the analyzer must find, straight from the simulation."""

    requests: list[_Req]
    steps: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    preempted_tokens: int
    recomputed_tokens: int

    def finished(self) -> list[_Req]:
        return [r for r in self.requests if r.finish_ns >= 0]


def arrival_ns(step_start_ns: int) -> int:
    return step_start_ns - 700_000


class Simulation:
    """Runs the specs through the scheduler, one step at a time."""

    def __init__(self, specs: list[Spec], engine: Engine):
        self.engine = engine
        self.reqs = [_Req(i, s) for i, s in enumerate(specs)]
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.steps: list[dict] = []
        self.rows: list[tuple] = []
        self.preemptions: list[tuple] = []
        self.t = T0_NS
        self.recomputed = 0

    def run(self) -> None:
        for step in range(self.engine.max_steps):
            if all(r.finish_ns >= 0 for r in self.reqs):
                return
            self.step(step)

    def step(self, step: int) -> None:
        start = self.t
        self.waiting += [r for r in self.reqs if r.spec.arrival_step == step]
        lost = self._preempt(step, start)
        budget = self.engine.max_num_batched_tokens
        scheduled = []
        for r in list(self.running):
            budget -= self._schedule(r, step, start, budget, scheduled)
        while (not lost and self.waiting and len(self.running) < self.engine.max_num_seqs
               and budget > 0):   # like vLLM: no admission in a step that preempted
            r = self.waiting.pop(0)
            self.running.append(r)
            budget -= self._schedule(r, step, start, budget, scheduled)
        self._finish_step(step, start, scheduled, lost)

    def _preempt(self, step: int, now: int) -> list[tuple]:
        lost = []
        for r in [r for r in self.running if step in r.spec.preempt_at]:
            used_before = self._blocks_used()
            self.preemptions.append((step, now, r.idx, r.computed, r.blocks, used_before))
            lost.append((r.computed, r.blocks))
            r.computed, r.blocks, r.resumed = 0, 0, True
            r.preemptions += 1
            self.running.remove(r)
            self.waiting.insert(0, r)
        return lost

    def _schedule(self, r: _Req, step: int, now: int, budget: int, scheduled: list) -> int:
        if budget <= 0:
            return 0
        if not r.scheduled_before:
            r.computed = r.spec.cached
            r.first_scheduled_ns, r.first_scheduled_step = now, step
        tokens = min(r.spec.prompt + r.emitted - r.computed, budget)
        phase = (S.PHASE_RESUMED if r.resumed else S.PHASE_RECOMPUTE if r.recomputing
                 else S.PHASE_PREFILL if not r.scheduled_before
                 else S.PHASE_CHUNKED if r.emitted == 0 else S.PHASE_DECODE)
        scheduled.append((r, phase, tokens, r.computed))
        r.recomputing = phase in (S.PHASE_RESUMED, S.PHASE_RECOMPUTE) and \
            r.computed + tokens < r.spec.prompt + r.emitted
        r.scheduled_before, r.resumed = True, False
        return tokens

    def _blocks_used(self) -> int:
        return sum(r.blocks for r in self.running)

    def _finish_step(self, step: int, start: int, scheduled: list, lost: list) -> None:
        e = self.engine
        decode = [x for x in scheduled if x[1] == S.PHASE_DECODE]
        prefill_tokens = sum(x[2] for x in scheduled if x[1] != S.PHASE_DECODE)
        context = sum(x[2] + x[3] for x in scheduled)
        a, b, c, d = e.model_ns
        end = start + int(a + b * len(decode) + c * prefill_tokens + d * context)
        allocated, freed, finished = 0, sum(blocks for _, blocks in lost), []
        for r, phase, tokens, computed in scheduled:
            self.recomputed += max(min(tokens + computed, self._high_water(r)) - computed, 0)
            r.computed = computed + tokens
            new_blocks = math.ceil(r.computed / e.block_size) - r.blocks
            r.blocks += new_blocks
            allocated += new_blocks
            self.rows.append((step, r.idx, phase, tokens, computed, new_blocks))
            if r.computed >= r.spec.prompt + r.emitted:
                self._emit(r, step, end)
            if r.emitted >= r.spec.output:
                r.finish_ns, r.finish_step = end, step
                freed += r.blocks
                finished.append(r)
        for r in finished:
            self.running.remove(r)
        self.steps.append(self._step_row(step, start, end, scheduled, allocated, freed,
                                         len(finished), lost))
        self.t = end + GAP_NS

    def _high_water(self, r: _Req) -> int:
        """Most tokens the request ever had computed before this row."""
        rows = [x for x in self.rows if x[1] == r.idx]
        return max((x[3] + x[4] for x in rows), default=0)

    def _emit(self, r: _Req, step: int, t: int) -> None:
        r.emitted += 1
        r.emissions.append((step, t))
        if r.first_token_ns < 0:
            r.first_token_ns, r.first_token_step = t, step

    def _step_row(self, step, start, end, scheduled, allocated, freed, n_finished, lost) -> dict:
        phases = [x[1] for x in scheduled]
        used = self._blocks_used()
        admitted = [x for x in scheduled if x[1] == S.PHASE_PREFILL]
        return {
            "step": step, "t_schedule_start_ns": start, "t_schedule_end_ns": start + 100_000,
            "t_update_start_ns": end - 50_000, "t_update_end_ns": end,
            "num_running": len(self.running) + n_finished, "num_waiting": len(self.waiting),
            "num_prefill_reqs": phases.count(S.PHASE_PREFILL),
            "num_chunked_reqs": phases.count(S.PHASE_CHUNKED) + phases.count(S.PHASE_RECOMPUTE),
            "num_decode_reqs": phases.count(S.PHASE_DECODE),
            "num_resumed_reqs": phases.count(S.PHASE_RESUMED),
            "prefill_tokens": sum(x[2] for x in scheduled if x[1] != S.PHASE_DECODE),
            "decode_tokens": sum(x[2] for x in scheduled if x[1] == S.PHASE_DECODE),
            "total_tokens": sum(x[2] for x in scheduled),
            "kv_blocks_used": used, "kv_blocks_free": self.engine.usable_blocks - used,
            "kv_blocks_cached": 0, "blocks_allocated": allocated, "blocks_freed": freed,
            "blocks_revived": 0, "blocks_evicted": 0,
            "prefix_hit_tokens": sum(x[3] for x in admitted),
            "preemptions": len(lost), "preempted_tokens": sum(c for c, _ in lost),
            "finished": n_finished, "rss_bytes": engine_rss(step), "hook_ns": 1000,
        }

    def request_rows(self) -> list[tuple]:
        rows = []
        for r in self.reqs:
            arrival = arrival_ns(self._step_start(r.spec.arrival_step))
            reason = ("length" if r.finish_ns >= 0 else
                      "running" if r.first_scheduled_ns >= 0 else "waiting")
            rows.append((r.idx, f"req-{r.idx}", arrival, arrival + 200_000, r.first_scheduled_ns,
                         r.first_token_ns, r.finish_ns, r.first_scheduled_step,
                         r.first_token_step, r.finish_step, r.spec.prompt, r.spec.cached,
                         r.emitted, r.spec.output, r.preemptions, reason))
        return rows

    def _step_start(self, step: int) -> int:
        if step < len(self.steps):
            return self.steps[step]["t_schedule_start_ns"]
        return self.t


def _batch(table: str, rows: list[tuple]) -> pa.RecordBatch:
    fields = S.TABLES[table]
    columns = list(zip(*rows)) if rows else [[] for _ in fields]
    return pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for f, c in zip(fields, columns)],
                                      schema=pa.schema(fields))


def _submit(session: TraceSession, table: str, rows: list[tuple], batch_rows: int) -> None:
    for lo in range(0, len(rows), batch_rows):
        chunk = rows[lo:lo + batch_rows]
        assert session.writer.submit(table, lambda t=table, c=chunk: _batch(t, c), len(chunk))


def run_metadata(engine: Engine) -> dict:
    return {"format_version": S.FORMAT_VERSION, "kvprof_version": "test", "vllm_version": "synthetic",
            "kv": {"block_size": engine.block_size, "bytes_per_block": engine.bytes_per_block,
                   "usable_blocks": engine.usable_blocks, "num_blocks": engine.usable_blocks + 1,
                   "kv_tensor_bytes": (engine.usable_blocks + 1) * engine.bytes_per_block},
            "hardware": {"memory_bytes": 64 * 2**30},
            "engine": {"max_num_seqs": engine.max_num_seqs,
                       "max_num_batched_tokens": engine.max_num_batched_tokens}}


def write(path: str, sim: Simulation, batch_rows: int = 7, forward: bool = True,
          worker: dict | None = None, gpu=None, device=None, ranks: int = 1, late=None) -> None:
    """The simulation's tables through TraceSession, in small batches (state across batches).

    ``worker``: the worker's run metadata (weights, RSS at start, cuda); ``gpu``: a
    function of the step number giving (nvml used, allocated, reserved, peak) bytes;
    ``device``: one giving the CUPTI collector's (gemm, attention, comm, memcpy, other
    ns, records) of the step. ``ranks`` workers each write a forward file; ``late``, a
    function of (step, rank), delays a rank's forward start by that many ns.
    """
    prepare_target(path, overwrite=True)
    parts = parts_dir(path)
    files = {"steps": path, **{t: f"{parts}/{S.PART_FILES[t]}"
                               for t in ("request_steps", "requests", "preemptions", "block_events", "prompts")}}
    run = run_metadata(sim.engine)
    session = TraceSession(path, files, "engine_core", run, max_pending=100_000)
    _submit(session, "steps", [tuple(s[f.name] for f in S.STEPS) for s in sim.steps], batch_rows)
    _submit(session, "request_steps", sim.rows, batch_rows)
    _submit(session, "requests", sim.request_rows(), batch_rows)
    _submit(session, "preemptions", sim.preemptions, batch_rows)
    session.close(extra={"kv_blocks_used_at_start": 0, "steps": len(sim.steps)})
    for rank in range(ranks if forward else 0):
        delay = late or (lambda step, rank: 0)
        session = TraceSession(path, {"forward": f"{parts}/{S.forward_file(rank)}"}, f"worker-{rank}",
                               {**run, "worker": worker or {}}, max_pending=100_000)
        _submit(session, "forward", [(s["step"], rank, s["t_schedule_end_ns"] + delay(s["step"], rank),
                                      s["t_update_start_ns"], None, worker_rss(s["step"]), 500,
                                      *(gpu(s["step"]) if gpu else (None,) * 4),
                                      *(device(s["step"]) if device else (None,) * 6))
                                     for s in sim.steps], batch_rows)
        session.close()


def worker_rss(step: int) -> int:
    """The synthetic worker's RSS at ``step``."""
    return 2_000_000_000 + 8192 * step


def engine_rss(step: int) -> int:
    """The synthetic EngineCore's RSS at ``step``."""
    return 1_000_000_000 + 4096 * step


def build(path, specs: list[Spec], engine: Engine | None = None, batch_rows: int = 7,
          **write_options) -> Truth:
    """Simulate ``specs``, write the trace at ``path``, return the ground truth."""
    sim = Simulation(specs, engine or Engine())
    sim.run()
    write(str(path), sim, batch_rows, **write_options)
    steps = {f.name: np.array([s[f.name] for s in sim.steps]) for f in S.STEPS}
    rows = {f.name: np.array([r[i] for r in sim.rows]) for i, f in enumerate(S.REQUEST_STEPS)}
    return Truth(sim.reqs, steps, rows, sum(p[3] for p in sim.preemptions), sim.recomputed)


def mixed_specs(n: int = 40, seed: int = 0) -> list[Spec]:
    """A varied workload: prompts from 1 to 900 tokens (chunked at the budget), 1 to 60
    outputs, staggered arrivals, prefix hits, a few preemptions."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        prompt = int(rng.integers(1, 900))
        cached = int(rng.integers(0, prompt // 16 + 1)) * 16 if rng.random() < 0.3 else 0
        cached = min(cached, prompt - 1) if prompt > 1 else 0
        arrival = int(rng.integers(0, 60))
        preempt = (arrival + int(rng.integers(2, 30)),) if rng.random() < 0.15 else ()
        specs.append(Spec(prompt, int(rng.integers(1, 61)), arrival, cached, preempt))
    return specs
