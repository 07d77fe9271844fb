"""EngineCore-side recording: the scheduler, the KV cache manager and the block pool.

Each ``on_*`` function is a hook body: it reads integers off vLLM's objects and
appends them to column buffers; nothing here allocates per block or per request
beyond what the table rows need. Step rows are completed at the end of
``update_from_output``, so the block counters of a row cover the window between
two consecutive update ends (equal to the step under synchronous scheduling).
"""
from __future__ import annotations

import itertools
import os
import time

from kvprof.format import schema as S
from kvprof.hooks import state
from kvprof.recorder.columns import ColumnBuffer, RowBuffer, columns_to_batch
from kvprof.recorder.memory import RssReader
from kvprof.recorder.session import TraceSession, parts_dir

_now = time.monotonic_ns
SYNC_TIMEOUT_S = 30.0   # a status call waits at most this long for the writer thread
_repeat = itertools.repeat


class Options:
    """What to record. ``detail="steps"`` turns block events off."""

    def __init__(self, detail: str = "blocks", flush_interval_s: float = 1.0,
                 flush_rows: int = 65536, rss_every: int = 16, record_prompts: bool = False,
                 fault_point: str | None = None, collector: bool = True, py_spy: bool = False,
                 py_spy_rate: int = 100):
        if detail not in ("steps", "blocks"):
            raise ValueError("detail must be 'steps' or 'blocks'")
        self.detail = detail
        self.flush_interval_ns = int(flush_interval_s * 1e9)
        self.flush_rows = flush_rows
        self.rss_every = max(1, rss_every)
        self.record_prompts = record_prompts
        self.fault_point = fault_point   # tests: make this hook raise (see hooks.state)
        self.collector = collector       # the CUPTI collector, where CUDA is (recorder.cupti)
        self.py_spy = bool(py_spy)       # sample host stacks with py-spy (recorder.pyspy)
        self.py_spy_rate = int(py_spy_rate)

    def to_dict(self) -> dict:
        return {"detail": self.detail, "flush_interval_s": self.flush_interval_ns / 1e9,
                "flush_rows": self.flush_rows, "rss_every": self.rss_every,
                "record_prompts": self.record_prompts, "fault_point": self.fault_point,
                "collector": self.collector, "py_spy": self.py_spy, "py_spy_rate": self.py_spy_rate}


class EngineRecorder:
    """Recording state for one traced run inside the EngineCore process."""

    def __init__(self, scheduler, path: str, options: Options, run: dict):
        self.scheduler = scheduler
        self.pool = scheduler.kv_cache_manager.block_pool
        self.options = options
        self.block_events_on = options.detail == "blocks"
        tables = {"steps": path}
        for table, name in S.PART_FILES.items():
            if table not in S.OPTIONAL_TABLES:   # py-spy's tables are written apart
                tables[table] = os.path.join(parts_dir(path), name)
        self.session = TraceSession(path, tables, "engine_core", run)
        self.req_index: dict[str, int] = {}
        self.requests_seen = 0
        self.buffers = {t: ColumnBuffer(t, S.TABLES[t]) for t in tables}
        self.buffers["steps"] = RowBuffer("steps", S.STEPS)
        self.buffers["request_steps"] = RequestStepBuffer(self.req_index, lambda: self.requests_seen)
        self.steps = self.buffers["steps"]
        self.req_steps = self.buffers["request_steps"]
        self.requests = self.buffers["requests"]
        self.blocks = self.buffers["block_events"]
        self.preempt = self.buffers["preemptions"]
        self.prompts = self.buffers["prompts"]
        self.rss = RssReader()
        self.rss_value = self.rss.read()
        self.wall_minus_mono_ns = time.time_ns() - _now()
        self.req_track: dict[int, list] = {}   # idx -> [queued, first_sched, first_sched_step, ftok, ftok_step, cached]
        self.awaiting_first_token: dict[str, int] = {}
        self.recomputing: dict[str, int] = {}    # resumed requests still recomputing
        self.in_flight: dict[int, tuple] = {}  # id(scheduler_output) -> (step, t0, t1, counts...)
        self.finished_pending: list[tuple] = []
        self.next_step = 0
        self.rows_emitted = 0
        self.in_update = False
        self.current_req = -1
        self.attr_from = 0
        self.last_flush_ns = _now()
        self.hook_ns = 0            # kvprof's own time in hooks since the last step row
        self.kv_used_at_start = self.kv_used()
        self._zero_counters()
        self.closed = False

    # ------------------------------------------------------------------ helpers
    def _zero_counters(self) -> None:
        self.n_alloc = self.n_freed = self.n_revived = self.n_evicted = 0
        self.n_prefix_hits = self.n_preempt = self.n_preempt_tokens = self.n_finished = 0

    def kv_used(self) -> int:
        return self.pool.num_gpu_blocks - 1 - self.pool.get_num_free_blocks()

    def index_of(self, request_id: str) -> int:
        idx = self.req_index.get(request_id)
        if idx is None:   # a counter, not len(): finished ids leave the index
            idx = self.req_index[request_id] = self.requests_seen
            self.requests_seen += 1
            self.req_track[idx] = [-1, -1, -1, -1, -1, 0]
        return idx

    def flush(self, force: bool = False) -> None:
        if self.session.writer.stats.error is not None and not self.closed:
            raise state.TraceWriteFailed(self.session.writer.stats.error)  # the hook guard stops tracing
        now = _now()
        if not force and now - self.last_flush_ns < self.options.flush_interval_ns \
                and len(self.req_steps) < self.options.flush_rows:
            return
        self.last_flush_ns = now
        full = [buf for buf in self.buffers.values() if len(buf)]
        if not full:
            return
        submit = self.session.writer.submit
        fault = state.FAULT_POINT == WRITER_FAULT and state.fault_now(WRITER_FAULT)  # counts flushes with rows
        for buf in full:
            builder, rows = buf.take()
            if fault:
                builder, fault = state.FailingBuilder(WRITER_FAULT, builder), False
            submit(buf.table, builder, rows)

    def sync(self, timeout: float = SYNC_TIMEOUT_S) -> None:
        """Hand every buffered row to the writer and wait until it is written, so that a
        write error is known now rather than at a later flush (raises TraceWriteFailed)."""
        self.flush(force=True)
        self.session.writer.wait_idle(timeout)
        self.flush(force=True)   # raises if the writer failed meanwhile

    # --------------------------------------------------------------- scheduler
    def on_add_request(self, request) -> None:
        idx = self.index_of(request.request_id)
        self.req_track[idx][0] = _now()
        if self.options.record_prompts and request.prompt_token_ids is not None:
            self.prompts.append_row(idx, list(request.prompt_token_ids))

    def before_schedule(self) -> int:
        self.attr_from = len(self.blocks)
        return _now()

    def after_schedule(self, t0: int, so) -> None:
        """O(1) per running request: the output's own lists are kept, expanded later."""
        t1 = _now()
        step = self.next_step
        self.next_step += 1
        nst = so.num_scheduled_tokens
        new_reqs = so.scheduled_new_reqs
        prefill_tokens = 0
        if new_reqs:
            prefill_tokens = self._new_request_rows(step, t0, new_reqs, nst)
        cr = so.scheduled_cached_reqs
        ids = cr.req_ids
        n = len(ids)
        n_chunked = n_resumed = 0
        if n:
            if cr.resumed_req_ids or self.recomputing or 0 in cr.num_output_tokens:
                n_chunked, n_resumed, other = self._explicit_cached_rows(step, cr, nst)
                prefill_tokens += other
            else:   # every request decodes: keep vLLM's lists, expand them later
                self.req_steps.add_cached(step, ids, cr.num_output_tokens,
                                          cr.num_computed_tokens, cr.new_block_ids, nst)
        if self.block_events_on and len(self.blocks) > self.attr_from:
            self._attribute_allocations(so)
        sched = self.scheduler
        total = so.total_num_scheduled_tokens
        counts = (len(new_reqs), n_chunked, n - n_chunked - n_resumed, n_resumed)
        self.in_flight[id(so)] = (step, t0, t1, len(sched.running), len(sched.waiting),
                                  counts, total - prefill_tokens)

    def _new_request_rows(self, step: int, t0: int, new_reqs, nst) -> int:
        rows = []
        tokens = 0
        for nr in new_reqs:
            rid = nr.req_id
            idx = self.index_of(rid)
            tr = self.req_track[idx]
            if tr[1] < 0:
                tr[1], tr[2] = t0, step
            if tr[3] < 0:
                self.awaiting_first_token[rid] = idx
            blocks = nr.block_ids
            n_tokens = nst[rid]
            tokens += n_tokens
            rows.append((step, idx, S.PHASE_PREFILL, n_tokens, nr.num_computed_tokens,
                         len(blocks[0]) if blocks else 0))
        self.req_steps.add_rows(rows)
        return tokens

    def _explicit_cached_rows(self, step: int, cr, nst) -> tuple[int, int, int]:
        """Chunked prefills or recomputations in the batch: classify row by row.

        A resumed request recomputes prompt + outputs; when that takes several steps,
        the later chunks carry output tokens yet are not decodes (PHASE_RECOMPUTE)."""
        chunked = resumed = tokens = 0
        rows = []
        requests = self.scheduler.requests
        for rid, outs, computed, blocks in zip(cr.req_ids, cr.num_output_tokens,
                                               cr.num_computed_tokens, cr.new_block_ids):
            idx = self.req_index[rid]
            n = nst[rid]
            if rid in cr.resumed_req_ids or rid in self.recomputing:
                phase = S.PHASE_RESUMED if rid in cr.resumed_req_ids else S.PHASE_RECOMPUTE
                resumed += phase == S.PHASE_RESUMED
                chunked += phase == S.PHASE_RECOMPUTE
                req = requests.get(rid)
                done = req is None or computed + n >= req.num_prompt_tokens + outs
                if done:
                    self.recomputing.pop(rid, None)
                else:
                    self.recomputing[rid] = idx
                if self.req_track[idx][3] < 0:
                    self.awaiting_first_token[rid] = idx
            elif outs == 0:
                phase = S.PHASE_CHUNKED
                chunked += 1
            else:
                rows.append((step, idx, S.PHASE_DECODE, n, computed, len(blocks[0]) if blocks else 0))
                continue
            tokens += n
            rows.append((step, idx, phase, n, computed, len(blocks[0]) if blocks else 0))
        self.req_steps.add_rows(rows)
        return chunked, resumed, tokens

    def _attribute_allocations(self, so) -> None:
        """Allocations during schedule() are attributed to requests from the output."""
        owner: dict[int, int] = {}
        for nr in so.scheduled_new_reqs:
            if nr.block_ids:
                owner.update(dict.fromkeys(nr.block_ids[0], self.req_index[nr.req_id]))
        cr = so.scheduled_cached_reqs
        for rid, b in zip(cr.req_ids, cr.new_block_ids):
            if b and b[0]:
                owner.update(dict.fromkeys(b[0], self.req_index[rid]))
        ev = self.blocks
        for i in range(self.attr_from, len(ev)):
            if ev.req[i] < 0:
                ev.req[i] = owner.get(ev.block_id[i], -1)

    def before_update(self) -> int:
        self.in_update = True
        return _now()

    def after_update(self, t2: int, so) -> None:
        self.in_update = False
        info = self.in_flight.pop(id(so), None)
        if info is None:
            return  # scheduled before tracing started
        step, t0, t1, running, waiting, counts, decode_tokens = info
        t3 = _now()
        self._stamp_first_tokens(t3, step)
        for row in self.finished_pending:
            self._write_request(row, t3, step)
        self.n_finished += len(self.finished_pending)
        self.finished_pending.clear()
        pool = self.pool
        free = pool.get_num_free_blocks()
        if step % self.options.rss_every == 0:
            self.rss_value = self.rss.read()
        total = so.total_num_scheduled_tokens
        self.steps.append((
            step, t0, t1, t2, t3, running, waiting,
            counts[0], counts[1], counts[2], counts[3], total - decode_tokens, decode_tokens, total,
            pool.num_gpu_blocks - 1 - free, free, len(pool.cached_block_hash_to_block),
            self.n_alloc, self.n_freed, self.n_revived, self.n_evicted, self.n_prefix_hits,
            self.n_preempt, self.n_preempt_tokens, self.n_finished, self.rss_value,
            min(self.hook_ns + _now() - t3, 2**31 - 1)))
        self.hook_ns = -(_now() - t3)   # the rest of this hook is counted by its wrapper
        self.rows_emitted += 1
        self._zero_counters()
        self.flush(force=not sched_busy(self.scheduler))

    def _stamp_first_tokens(self, t: int, step: int) -> None:
        if not self.awaiting_first_token:
            return
        requests = self.scheduler.requests
        done = []
        for rid, idx in self.awaiting_first_token.items():
            req = requests.get(rid)
            if req is not None and req.num_output_tokens > 0:
                tr = self.req_track[idx]
                tr[3], tr[4] = t, step
                done.append(rid)
        for rid in done:
            del self.awaiting_first_token[rid]

    def on_prefix_hits(self, request, num_hits: int) -> None:
        self.n_prefix_hits += num_hits
        tr = self.req_track[self.index_of(request.request_id)]
        if request.num_preemptions == 0:
            tr[5] = num_hits

    def before_preempt(self, request) -> tuple:
        return (self.index_of(request.request_id), request.num_computed_tokens,
                self.pool.get_num_free_blocks(), self.kv_used())

    def after_preempt(self, token: tuple) -> None:
        idx, computed, free_before, used_before = token
        freed = self.pool.get_num_free_blocks() - free_before
        self.preempt.append_row(self.rows_emitted, _now(), idx, computed, freed, used_before)
        self.n_preempt += 1
        self.n_preempt_tokens += computed

    def on_free_request(self, request) -> None:
        """A request finished or was aborted; its row is written at the step's end."""
        idx = self.index_of(request.request_id)
        reason = request.get_finished_reason()
        row = (idx, request.request_id, request.arrival_time, request.num_prompt_tokens,
               request.num_output_tokens, request.max_tokens, request.num_preemptions,
               str(reason) if reason is not None else request.status.name.lower())
        if request.request_id in self.awaiting_first_token and request.num_output_tokens > 0:
            tr = self.req_track[idx]
            tr[3], tr[4] = -2, self.rows_emitted   # stamped with the finish below
            del self.awaiting_first_token[request.request_id]
        self.awaiting_first_token.pop(request.request_id, None)
        self.recomputing.pop(request.request_id, None)
        self.req_steps.retire(request.request_id)
        if self.in_update:
            self.finished_pending.append(row)
        else:
            self._write_request(row, _now(), self.rows_emitted)
            self.n_finished += 1

    def _write_request(self, row: tuple, t_finish: int, step: int) -> None:
        idx, rid, arrival, prompt, output, max_tokens, preemptions, reason = row
        tr = self.req_track.pop(idx, None) or [-1, -1, -1, -1, -1, 0]
        if tr[3] == -2:
            tr[3], tr[4] = t_finish, step
        arrival_ns = int(arrival * 1e9) - self.wall_minus_mono_ns if arrival else -1
        self.requests.append_row(idx, rid, arrival_ns, tr[0], tr[1], tr[3], t_finish,
                                 tr[2], tr[4], step, prompt, tr[5], output,
                                 max_tokens if max_tokens is not None else -1,
                                 preemptions, reason)

    # -------------------------------------------------------------- block pool
    def before_free_request_blocks(self, request) -> None:
        self.current_req = self.req_index.get(request.request_id, -1)

    def after_get_new_blocks(self, blocks: list) -> None:
        n = len(blocks)
        self.n_alloc += n
        if self.block_events_on and n:
            ev = self.blocks
            ev.step.extend(_repeat(self.rows_emitted, n))
            ev.kind.extend(_repeat(S.BLOCK_ALLOC, n))
            ev.req.extend(_repeat(self.current_req, n))
            ev.block_id.extend([b.block_id for b in blocks])

    def before_touch(self, blocks) -> tuple:
        ids = None
        if self.block_events_on:
            ids = [b.block_id for b in blocks if b.ref_cnt == 0 and not b.is_null]
        return self.pool.get_num_free_blocks(), ids

    def after_touch(self, token: tuple) -> None:
        free_before, ids = token
        self.n_revived += free_before - self.pool.get_num_free_blocks()
        if ids:
            self._block_events(S.BLOCK_REVIVE, ids)

    def after_free_blocks(self, free_before: int, blocks: list) -> None:
        self.n_freed += self.pool.get_num_free_blocks() - free_before
        if self.block_events_on:
            ids = [b.block_id for b in blocks if b.ref_cnt == 0 and not b.is_null]
            if ids:
                self._block_events(S.BLOCK_FREE, ids)

    def on_evicted(self, block) -> None:
        self.n_evicted += 1
        if self.block_events_on:
            self._block_events(S.BLOCK_EVICT, [block.block_id])

    def _block_events(self, kind: int, ids: list) -> None:
        n = len(ids)
        ev = self.blocks
        ev.step.extend(_repeat(self.rows_emitted, n))
        ev.kind.extend(_repeat(kind, n))
        ev.req.extend(_repeat(self.current_req, n))
        ev.block_id.extend(ids)

    # ---------------------------------------------------------------- closing
    def unfinished_rows(self) -> None:
        """Requests still in the engine when tracing stops get a row with finish -1."""
        for rid, req in list(self.scheduler.requests.items()):
            idx = self.req_index.get(rid)
            if idx is None or idx not in self.req_track:
                continue
            state = "running" if req in self.scheduler.running else "waiting"
            row = (idx, rid, req.arrival_time, req.num_prompt_tokens, req.num_output_tokens,
                   req.max_tokens, req.num_preemptions, state)
            self._write_request(row, -1, -1)

    def close(self, cut_short: str | None = None) -> dict:
        if self.closed:
            return {}
        self.closed = True
        try:
            if cut_short is None:
                self.unfinished_rows()
            self.flush(force=True)
        finally:
            self.rss.close()
        return self.session.close(cut_short, extra={
            "steps": self.rows_emitted, "requests_seen": self.requests_seen,
            "kv_blocks_used_at_start": self.kv_used_at_start})


WRITER_FAULT = "TraceWriter.engine_core"   # fault-injection name of this process's writer thread


def sched_busy(scheduler) -> bool:
    """False when the engine is about to idle: then buffered rows are written at once."""
    return bool(scheduler.running or scheduler.waiting)


class RequestStepBuffer:
    """request_steps rows, kept as references to each step's scheduler-output lists.

    vLLM builds those lists fresh every step and never mutates them afterwards, so
    holding them until the next flush is safe; the writer thread expands them
    into columns with NumPy, keeping per-request work off the engine thread.
    """

    table = "request_steps"
    fields = S.REQUEST_STEPS

    def __init__(self, req_index: dict[str, int], requests_seen=lambda: 0):
        self.req_index = req_index
        self.requests_seen = requests_seen
        self.rows: list[tuple] = []      # explicit rows (new requests)
        self.chunks: list[tuple] = []    # (step, ids, outs, computed, new_block_ids, nst)
        self.retired: list[str] = []     # finished request ids, dropped from req_index after use
        self.count = 0
        self.accepted_seen = 0           # requests indexed when the last batch the writer took was taken

    def __len__(self) -> int:
        return self.count

    def retire(self, request_id: str) -> None:
        """A finished request: its id leaves the index once this batch is expanded."""
        self.retired.append(request_id)

    def add_rows(self, rows: list[tuple]) -> None:
        self.rows.extend(rows)
        self.count += len(rows)

    def add_cached(self, step, ids, outs, computed, new_block_ids, nst) -> None:
        """A step where every cached request decodes."""
        self.chunks.append((step, ids, outs, computed, new_block_ids, nst))
        self.count += len(ids)

    def take(self):
        batch = RequestStepsBatch(self, self.rows, self.chunks, self.retired)
        count, self.accepted_seen = self.count, self.requests_seen()
        self.rows, self.chunks, self.retired, self.count = [], [], [], 0
        return batch, count

    def dropped(self, batch: "RequestStepsBatch") -> None:
        """Engine thread, the writer's queue full: the batch's finished ids leave the index
        now, unless a batch still queued may need them (indexed before it was taken)."""
        self.accepted_seen = batch.accepted_before
        keep = []
        for request_id in batch.retired:
            idx = self.req_index.get(request_id)
            if idx is not None and idx < self.accepted_seen:
                keep.append(request_id)
            else:
                self.req_index.pop(request_id, None)
        self.retired[:0] = keep


class RequestStepsBatch:
    """The writer thread's builder for one request_steps batch (see ``TraceWriter.submit``)."""

    def __init__(self, buffer: RequestStepBuffer, rows, chunks, retired):
        self.buffer, self.rows, self.chunks, self.retired = buffer, rows, chunks, retired
        self.accepted_before = buffer.accepted_seen

    def __call__(self):
        batch = expand_request_steps(self.rows, self.chunks, self.buffer.req_index)
        self.discard(final=True)   # keeps the index as small as the running set
        return batch

    def discard(self, final: bool) -> None:
        """A dropped batch: without this, finished ids would stay in the index for good.
        ``final``: no batch will ever be built again (the writer stopped), so all go now."""
        if final:
            for request_id in self.retired:
                self.buffer.req_index.pop(request_id, None)
        else:
            self.buffer.dropped(self)


def _new_blocks_of(new_block_ids: list):
    if new_block_ids.count(None) == len(new_block_ids):
        return _repeat(0, len(new_block_ids))
    return (len(b[0]) if b else 0 for b in new_block_ids)


def expand_request_steps(rows: list[tuple], chunks: list[tuple], req_index: dict):
    """Writer thread: rows and kept scheduler-output lists -> one RecordBatch, ordered by step."""
    import numpy as np

    chain = itertools.chain.from_iterable
    n = sum(len(c[1]) for c in chunks)
    step = np.repeat(np.array([c[0] for c in chunks], np.int32), [len(c[1]) for c in chunks])
    req = np.fromiter(map(req_index.__getitem__, chain(c[1] for c in chunks)), np.int32, n)
    tokens = np.fromiter(chain(map(c[5].__getitem__, c[1]) for c in chunks), np.int32, n)
    computed = np.fromiter(chain(c[3] for c in chunks), np.int32, n)
    new_blocks = np.fromiter(chain(_new_blocks_of(c[4]) for c in chunks), np.int16, n)
    phase = np.full(n, S.PHASE_DECODE, np.uint8)
    columns = [step, req, phase, tokens, computed, new_blocks]
    if rows:
        explicit = [np.array(col, dtype=ref.dtype) for col, ref in zip(zip(*rows), columns)]
        columns = [np.concatenate([a, b]) for a, b in zip(explicit, columns)]
        order = np.argsort(columns[0], kind="stable")
        columns = [c[order] for c in columns]
    return columns_to_batch(S.REQUEST_STEPS, [np.ascontiguousarray(c) for c in columns])
