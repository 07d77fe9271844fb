"""AsyncLLM under load: hundreds of concurrent requests, some aborted mid-generation,
then start / stop / start of tracing on the same engine.

One AsyncLLM for the whole file; everything the engine does runs in one event loop
(the module fixture), and the tests assert on what it returned.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

import kvprof
from kvprof.format import schema as S

from .checks import block_identity, token_identity
from .conftest import external_id

pytestmark = pytest.mark.engine

N_REQUESTS = 300
MAX_TOKENS = 16
ABORT_EVERY = 7          # requests 0, 7, 14, ... are aborted once they have ABORT_AFTER tokens:
ABORT_AFTER = 3          # even multiples by engine.abort(), odd ones by closing the generator
WAITING_ABORTS = (281, 289, 297)   # aborted while still queued (300 requests, 48 slots)
PLANNED_ABORTS = len(range(0, N_REQUESTS, ABORT_EVERY)) + len(WAITING_ABORTS)
RESTART_REQUESTS = 24


def _workload(n, max_tokens, seed):
    from kvprof.models.workload import make_workload
    return make_workload(n, max_tokens=max_tokens, seed=seed, length_scale=0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    return asyncio.run(_drive(folder))


async def _drive(folder: Path) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from kvprof.models.engine import engine_kwargs

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(**engine_kwargs(max_num_seqs=48, enforce_eager=True)))
    try:
        load = await _load_run(engine, folder / "load.arrow")
        restart = await _start_stop_start(engine, folder)
    finally:
        engine.shutdown()
        del engine
    return {"load": load, "restart": restart}


# ------------------------------------------------------------------ the load run
async def _load_run(engine, path: Path) -> dict:
    wl = _workload(N_REQUESTS, MAX_TOKENS, seed=11)
    params = wl.sampling_params()
    first_output = asyncio.Event()

    async def consume(i, prompt):
        """(request id, tokens the client saw, how it ended)."""
        rid, seen, reason, aborted = f"load-{i}", 0, None, False
        gen = engine.generate(prompt, params, request_id=rid)
        async for out in gen:
            first_output.set()
            seen, reason = len(out.outputs[0].token_ids), out.outputs[0].finish_reason
            if i % ABORT_EVERY == 0 and seen >= ABORT_AFTER and not aborted:
                aborted = True
                if i % (2 * ABORT_EVERY):
                    await gen.aclose()   # as a client that goes away
                    return rid, seen, "closed"
                await engine.abort(rid)   # the stream then ends with an "abort" output
        return rid, seen, reason

    async def abort_while_waiting(i, prompt):
        task = asyncio.create_task(consume(i, prompt))
        await first_output.wait()
        # abort() of an id the front end has not registered yet does nothing: wait for it
        while f"load-{i}" not in engine.output_processor.external_req_ids:
            await asyncio.sleep(0.005)
        await engine.abort(f"load-{i}")
        return await task

    def client(i, prompt):
        return abort_while_waiting(i, prompt) if i in WAITING_ABORTS else consume(i, prompt)

    started = time.perf_counter()
    async with kvprof.trace(engine, path) as handle:
        results = await asyncio.gather(*(client(i, p) for i, p in enumerate(wl.prompts())))
    wall = time.perf_counter() - started
    trace = kvprof.open_trace(path)
    print(f"\nload: {N_REQUESTS} requests in {wall:.1f} s, {trace['steps'].num_rows} steps, "
          f"{sum(r[2] in ('abort', 'closed') for r in results)} aborted, "
          f"rows dropped {trace.rows_dropped or 0}, writer build "
          f"{trace.end_records['engine_core']['writer_build_ns'] / 1e6:.1f} ms")
    return {"clients": {rid: (seen, how) for rid, seen, how in results},
            "trace": trace, "summary": handle.summary, "wall_s": wall}


@pytest.fixture(scope="module")
def load(runs):
    return runs["load"]


@pytest.fixture(scope="module")
def requests(load):
    req = load["trace"]["requests"].to_pandas()
    req["rid"] = req.request_id.map(external_id)
    return req.set_index("rid")


def _client_aborted(load) -> set[str]:
    return {rid for rid, (_, how) in load["clients"].items() if how in ("abort", "closed")}


def test_every_request_has_one_row(load, requests):
    assert load["trace"].complete, load["trace"].warnings
    assert requests.index.is_unique and requests.req.is_unique
    assert set(requests.index) == set(load["clients"]) and len(requests) == N_REQUESTS


def test_each_abort_is_recorded_with_reason_abort(load, requests):
    aborted = _client_aborted(load)
    assert len(aborted) == PLANNED_ABORTS
    assert set(requests.index[requests.finish_reason == "abort"]) == aborted
    assert (requests.drop(index=list(aborted)).finish_reason == "length").all()
    assert (requests.finish_ns > 0).all() and (requests.finish_step >= 0).all()


def test_token_counts_match_what_the_clients_received(load, requests):
    aborted = _client_aborted(load)
    for rid, (seen, _) in load["clients"].items():
        out = requests.loc[rid].output_tokens
        if rid not in aborted:
            assert out == seen == MAX_TOKENS, rid
        else:   # tokens already in flight to the front end when the abort arrived are counted
            assert seen <= out < MAX_TOKENS, (rid, seen, out)
    mid = [f"load-{i}" for i in range(0, N_REQUESTS, ABORT_EVERY)]
    assert (requests.loc[mid].output_tokens >= ABORT_AFTER).all()


def test_requests_aborted_while_waiting_were_never_scheduled(load, requests):
    waiting = requests.loc[[f"load-{i}" for i in WAITING_ABORTS]]
    assert (waiting.finish_reason == "abort").all()
    assert (waiting.output_tokens == 0).all() and (waiting.first_scheduled_ns == -1).all()
    assert not set(waiting.req) & set(load["trace"]["request_steps"].to_pandas().req)


def test_token_conservation_counts_the_token_an_abort_discards(load, requests):
    """vLLM 0.32 takes aborts that arrive during a forward just before update_from_output:
    the request was scheduled and computed in that step (its finish step), its token is
    discarded. Every other request satisfies the plain identity."""
    trace = load["trace"]
    rs = trace["request_steps"].to_pandas()
    last_step = rs.groupby("req").step.max()
    aborted = requests[requests.finish_reason == "abort"]
    mid_forward = set(aborted.request_id[aborted.finish_step.to_numpy()
                                         == last_step.reindex(aborted.req).to_numpy()])
    problems = token_identity(trace)
    assert set(problems) == mid_forward
    assert all(got == expected + 1 for got, expected in problems.values())
    assert len(mid_forward) >= 1   # the load makes some abort land mid-forward
    print(f"\naborts taken mid-forward: {len(mid_forward)} of {len(aborted)}")


def test_block_conservation(load):
    trace = load["trace"]
    assert block_identity(trace) == []
    st = trace["steps"].to_pandas()
    assert (st.kv_blocks_used + st.kv_blocks_free == trace.run["kv"]["usable_blocks"]).all()
    assert st.kv_blocks_used.iloc[-1] == 0


def _block_lifecycles(ev) -> dict[int, int]:
    """Replay block events: each block alternates taken (alloc / revive) and freed;
    an eviction only hits a free block. Returns {block: owner} of blocks still taken."""
    taken: dict[int, int] = {}
    for kind, req, block in zip(ev.kind, ev.req, ev.block_id):
        if kind in (S.BLOCK_ALLOC, S.BLOCK_REVIVE):
            assert block not in taken, f"block {block} taken twice"
            taken[block] = req
        elif kind == S.BLOCK_FREE:
            assert block in taken, f"block {block} freed while free"
            del taken[block]
        else:
            assert block not in taken, f"block {block} evicted while in use"
    return taken


def test_every_block_of_an_aborted_request_is_freed(load, requests):
    trace = load["trace"]
    assert trace.end_records["engine_core"]["kv_blocks_used_at_start"] == 0
    ev = trace["block_events"].to_pandas()
    assert _block_lifecycles(ev) == {}   # every block taken during the trace went back
    aborted = requests.loc[sorted(_client_aborted(load))]
    allocated = ev[ev.kind == S.BLOCK_ALLOC].groupby("req").block_id.apply(set)
    freed = ev[ev.kind == S.BLOCK_FREE]
    for idx, finish_step in zip(aborted.req, aborted.finish_step):
        own = allocated.get(idx, set())
        mine = freed[freed.req == idx]
        assert (mine.step == finish_step).all()
        # its last block holds its own output tokens: never shared, freed by the abort
        assert bool(own) == (not mine.empty), idx


def test_the_writer_kept_up_or_counted_its_drops(load):
    trace, summary = load["trace"], load["summary"]
    steps = trace["steps"].to_pandas().step.to_numpy()
    assert summary["rows_dropped"] == trace.end_records["engine_core"]["rows_dropped"]
    if not trace.rows_dropped:
        assert np.array_equal(steps, np.arange(summary["steps"]))
        assert trace["forward"].num_rows >= len(steps)
    else:
        assert not trace.complete and any("rows dropped" in w for w in trace.warnings)


def test_analysis_of_the_load_trace(load, requests):
    from kvprof.analysis import analyze
    report = analyze(load["trace"]).to_dict()
    assert report["requests"] == N_REQUESTS - len(WAITING_ABORTS)   # those with a request-step row
    assert report["requests_finished"] == N_REQUESTS and report["requests_unfinished"] == 0
    assert report["tokens"]["input"] == requests.prompt_tokens.sum() - requests.loc[
        [f"load-{i}" for i in WAITING_ABORTS]].prompt_tokens.sum()


def test_analysis_output_tokens_are_the_tokens_delivered(load, requests):
    """vLLM discards the token of a request aborted while its last step ran: not counted."""
    from kvprof.analysis import analyze
    assert analyze(load["trace"]).to_dict()["tokens"]["output"] == requests.output_tokens.sum()


# --------------------------------------------------------- start / stop / start
async def _start_stop_start(engine, folder: Path) -> dict:
    """Untraced, then traced twice to two paths with different request ids."""
    wl = _workload(RESTART_REQUESTS, 12, seed=4)

    async def run_all(prefix):
        await engine.reset_prefix_cache()

        async def one(i, prompt):
            final = None
            async for out in engine.generate(prompt, wl.sampling_params(), request_id=f"{prefix}-{i}"):
                final = out
            return list(final.outputs[0].token_ids)
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(wl.prompts())))

    untraced = await run_all("u")
    first, second = folder / "first.arrow", folder / "second.arrow"
    async with kvprof.trace(engine, first):
        out_first = await run_all("a")
    first_files = _digest(first)
    async with kvprof.trace(engine, second):
        out_second = await run_all("b")
    return {"untraced": untraced, "outputs": [out_first, out_second],
            "paths": [first, second], "first_files_before": first_files,
            "first_files_after": _digest(first)}


def _digest(path: Path) -> dict[str, str]:
    files = [path, *sorted(Path(str(path) + S.PARTS_SUFFIX).iterdir())]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def restart(runs):
    r = runs["restart"]
    r["traces"] = [kvprof.open_trace(p) for p in r["paths"]]
    return r


def test_two_traces_from_one_engine_are_separate_and_complete(restart):
    from kvprof.analysis import analyze
    for trace, prefix in zip(restart["traces"], "ab"):
        assert trace.complete, trace.warnings
        req = trace["requests"].to_pandas()
        assert sorted(req.request_id.map(external_id)) == sorted(
            f"{prefix}-{i}" for i in range(RESTART_REQUESTS))
        steps = trace["steps"].to_pandas().step.to_numpy()
        assert np.array_equal(steps, np.arange(len(steps)))      # each numbered from 0
        assert set(trace["request_steps"].to_pandas().step) <= set(steps)
        assert set(trace["request_steps"].to_pandas().req) == set(req.req)
        assert token_identity(trace) == {} and block_identity(trace) == []
        assert analyze(trace).to_dict()["requests"] == RESTART_REQUESTS
    assert restart["first_files_after"] == restart["first_files_before"]   # untouched by the second
    assert os.path.getsize(restart["paths"][0]) > 0


def test_outputs_identical_with_and_without_tracing(restart):
    assert all(len(t) == 12 for t in restart["untraced"])
    assert restart["outputs"][0] == restart["untraced"]
    assert restart["outputs"][1] == restart["untraced"]
