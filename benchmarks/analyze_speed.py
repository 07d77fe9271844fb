"""How fast the analyzer is: kernels, ``kvprof analyze --json`` as a process, DuckDB and polars.

    python benchmarks/analyze_speed.py --rows 10000000 [--seqs 64] [--repeat 3] [--keep DIR]

Builds a trace of N request-step rows through kvprof's own writer (TraceSession):
``--seqs`` decode slots that each run requests back to back (prompts up to 2K
tokens in 1024-token chunks, 32-512 output tokens), so every step holds one row
per slot, like a saturated vLLM engine. Then times, in the same run and on the
same file:
  (a) the request-step pass alone (the numba kernel over the record batches of a
      trace in memory), and ``read_trace`` + ``analyze()`` in this process (all
      the JSON report holds), numba already loaded;
  (b) ``kvprof analyze --json`` as a whole process, first with an empty numba
      cache (cold start: JIT compile) and then warm (best of ``--repeat``);
  (c) DuckDB and polars computing the same latency and throughput aggregates:
      TTFT / TPOT / E2E / queue means and p50/p90/p99 from the requests table,
      ITL from request_steps, token counts and rates. The sampling rule is written
      without recursion for them: a row samples iff computed + tokens >= prompt and
      exceeds the request's largest earlier computed + tokens (the same rows as
      kvprof's rule on these traces; the answers are compared and printed). That
      needs a window over each request's rows in step order, i.e. a sort. Their
      time includes reading the Arrow streams, like kvprof's.
The last line: ``analyze: <M> rows/s; vs duckdb: <X>x; vs polars: <Y>x; cold start: <S> s``
where M is the kernel's rate, X and Y each engine's time over kvprof's
``read_trace`` + ``analyze()`` time on the same file, and S the first
``kvprof analyze --json`` process with an empty numba cache.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from kvprof.format import schema as S
from kvprof.recorder.session import TraceSession, parts_dir, prepare_target

FLUSH_ROWS = 65536
CHUNK = 1024
BLOCK_SIZE = 16
MODEL_NS = (3e6, 40e3, 10e3, 5.0)   # fixed, per decode request, per prefill token, per context token


# ------------------------------------------------------------------ the synthetic trace
def slot_requests(rng, n_steps: int, n_slots: int) -> dict[str, np.ndarray]:
    """Requests per slot, enough to fill ``n_steps`` rows in each slot."""
    per_slot = int(n_steps / 150 * 1.6) + 8
    n = per_slot * n_slots
    prompt = np.clip(rng.lognormal(5.8, 0.8, n), 16, 2048).astype(np.int64)
    cached = np.where(rng.random(n) < 0.3, (prompt // 2) // BLOCK_SIZE * BLOCK_SIZE, 0)
    output = rng.integers(32, 513, n)
    chunks = -(-(prompt - cached) // CHUNK)
    return {"slot": np.repeat(np.arange(n_slots), per_slot), "prompt": prompt, "cached": cached,
            "output": output, "chunks": chunks, "rows": chunks + output - 1}


def slot_rows(req: dict, n_steps: int, n_slots: int) -> dict[str, np.ndarray]:
    """Each slot's rows, request after request, cut at ``n_steps``; then in step order."""
    rows = req["rows"].reshape(n_slots, -1)
    assert (rows.sum(axis=1) >= n_steps).all(), "not enough requests to fill every slot"
    start = np.concatenate([np.zeros((n_slots, 1), np.int64), np.cumsum(rows, axis=1)[:, :-1]], axis=1)
    # request of each (slot, position): searchsorted within each slot's cumulative starts
    pos = np.arange(n_steps)
    local = np.stack([np.searchsorted(start[s], pos, side="right") - 1 for s in range(n_slots)])
    rid = local + np.arange(n_slots)[:, None] * rows.shape[1]
    k = pos[None, :] - start.ravel()[rid]                        # row index within its request
    prompt, cached, chunks = req["prompt"][rid], req["cached"][rid], req["chunks"][rid]
    prefill = k < chunks
    computed = np.where(prefill, cached + k * CHUNK, prompt + (k - chunks))
    tokens = np.where(prefill, np.minimum(CHUNK, prompt - computed), 1)
    phase = np.where(prefill, np.where(k == 0, S.PHASE_PREFILL, S.PHASE_CHUNKED), S.PHASE_DECODE)
    order = lambda a: np.ascontiguousarray(a.T).ravel()     # noqa: E731  step-major
    return {"step": np.repeat(np.arange(n_steps, dtype=np.int32), n_slots), "rid": order(rid),
            "phase": order(phase).astype(np.uint8), "tokens": order(tokens).astype(np.int32),
            "computed": order(computed).astype(np.int32), "k": order(k)}


def dense_ids(rid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Request numbers in order of first appearance: (used ids, dense index per row,
    first row and last row of each used id)."""
    used, first = np.unique(rid, return_index=True)
    last = rid.size - 1 - np.unique(rid[::-1], return_index=True)[1]
    order = np.argsort(first)
    dense = np.empty(rid.max() + 1, np.int32)
    dense[used[order]] = np.arange(used.size, dtype=np.int32)
    return used[order], dense[rid], first[order], last[order]


def steps_table(rows: dict, n_steps: int, rng) -> tuple[dict, np.ndarray, np.ndarray]:
    """The steps columns from the rows, with step times from MODEL_NS plus noise."""
    step, phase, tokens = rows["step"], rows["phase"], rows["tokens"]
    ctx = rows["computed"].astype(np.int64) + tokens
    def count(mask, weights=None):
        w = None if weights is None else weights[mask]
        return np.bincount(step[mask], w, minlength=n_steps).astype(np.int64)
    decode = phase == S.PHASE_DECODE
    n_decode, prefill_tokens = count(decode), count(~decode, tokens)
    context = np.bincount(step, ctx, minlength=n_steps)
    step_ns = (MODEL_NS[0] + MODEL_NS[1] * n_decode + MODEL_NS[2] * prefill_tokens
               + MODEL_NS[3] * context) * rng.normal(1, 0.03, n_steps)
    start = np.cumsum(np.concatenate([[10**12], step_ns[:-1].astype(np.int64) + 50_000]))
    end = start + step_ns.astype(np.int64)
    used = np.bincount(step, -(-ctx // BLOCK_SIZE), minlength=n_steps).astype(np.int64)
    cols = {
        "step": np.arange(n_steps), "t_schedule_start_ns": start,
        "t_schedule_end_ns": start + 200_000, "t_update_start_ns": end - 100_000,
        "t_update_end_ns": end, "num_running": count(np.ones_like(decode)),
        "num_waiting": rng.integers(0, 40, n_steps),
        "num_prefill_reqs": count(phase == S.PHASE_PREFILL),
        "num_chunked_reqs": count(phase == S.PHASE_CHUNKED), "num_decode_reqs": n_decode,
        "num_resumed_reqs": np.zeros(n_steps), "prefill_tokens": prefill_tokens,
        "decode_tokens": count(decode, tokens), "total_tokens": count(np.ones_like(decode), tokens),
        "kv_blocks_used": used, "kv_blocks_free": 40_000 - used,
    }
    return cols, start, end


def requests_table(req: dict, rows: dict, start: np.ndarray, end: np.ndarray,
                   n_steps: int) -> dict:
    used, dense, first_row, last_row = dense_ids(rows["rid"])
    rows["req"] = dense
    n = used.size
    first_step, last_step = rows["step"][first_row].astype(np.int64), rows["step"][last_row].astype(np.int64)
    samples = (rows["k"] >= req["chunks"][rows["rid"]] - 1).astype(np.float64)
    emitted = np.bincount(dense, samples, minlength=n).astype(np.int64)
    chunks, output = req["chunks"][used], req["output"][used]
    first_token_step = np.where(emitted > 0, first_step + chunks - 1, -1)
    done = emitted >= output
    scheduled = start[first_step]
    return {
        "req": np.arange(n), "request_id": [f"bench-{i}" for i in range(n)],
        "arrival_ns": scheduled - 5_000_000, "queued_ns": scheduled - 4_000_000,
        "first_scheduled_ns": scheduled,
        "first_token_ns": np.where(emitted > 0, end[np.maximum(first_token_step, 0)], -1),
        "finish_ns": np.where(done, end[last_step], -1), "first_scheduled_step": first_step,
        "first_token_step": first_token_step, "finish_step": np.where(done, last_step, -1),
        "prompt_tokens": req["prompt"][used], "cached_prompt_tokens": req["cached"][used],
        "output_tokens": np.minimum(emitted, output), "max_tokens": output,
        "preemptions": np.zeros(n), "finish_reason": np.where(done, "length", "running").tolist(),
    }


def record_batch(table: str, cols: dict, lo: int, hi: int) -> pa.RecordBatch:
    fields = S.TABLES[table]
    arrays = []
    for f in fields:
        values = cols.get(f.name, 0)
        if values is None:
            arrays.append(pa.nulls(hi - lo, f.type))
            continue
        piece = np.full(hi - lo, values) if np.isscalar(values) else values[lo:hi]
        arrays.append(pa.array(piece, type=f.type) if isinstance(piece, list)
                      else pa.array(np.asarray(piece).astype(f.type.to_pandas_dtype())))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def submit_all(session: TraceSession, tables: dict[str, dict], n_rows: dict[str, int]) -> None:
    for table, cols in tables.items():
        for lo in range(0, n_rows[table], FLUSH_ROWS):
            hi = min(lo + FLUSH_ROWS, n_rows[table])
            build = lambda t=table, c=cols, a=lo, b=hi: record_batch(t, c, a, b)  # noqa: E731
            assert session.writer.submit(table, build, hi - lo), "writer queue full"


def write_trace(path: str, tables: dict[str, dict], n_rows: dict[str, int], run: dict) -> None:
    """Through TraceSession, in flush-sized batches, as the recorder hands them over: the
    EngineCore's tables, and the forward table of worker 0."""
    prepare_target(path, overwrite=True)
    parts = parts_dir(path)
    files = {t: path if t == "steps" else os.path.join(parts, S.PART_FILES[t])
             for t in ("steps", "request_steps", "requests", "preemptions", "block_events", "prompts")}
    pending = sum(n // FLUSH_ROWS + 2 for n in n_rows.values())
    rows = sum(n_rows.values()) + 1     # the whole trace may wait in the queue: nothing dropped
    engine = TraceSession(path, files, "engine_core", run, max_pending=pending, max_pending_rows=rows)
    submit_all(engine, {t: c for t, c in tables.items() if t != "forward"}, n_rows)
    record = engine.close(extra={"kv_blocks_used_at_start": 0, "steps": n_rows["steps"]})
    worker = TraceSession(path, {"forward": os.path.join(parts, S.forward_file(0))}, "worker-0", run,
                          max_pending=pending, max_pending_rows=rows)
    submit_all(worker, {"forward": tables["forward"]}, n_rows)
    assert all(r["complete"] and not r["rows_dropped"] for r in (record, worker.close())), record


def build_trace(path: str, n_rows: int, n_slots: int = 64, seed: int = 0) -> dict:
    """A trace of about ``n_rows`` request-step rows; returns its row counts."""
    rng = np.random.default_rng(seed)
    n_steps = max(n_rows // n_slots, 2)
    req = slot_requests(rng, n_steps, n_slots)
    rows = slot_rows(req, n_steps, n_slots)
    steps, start, end = steps_table(rows, n_steps, rng)
    requests = requests_table(req, rows, start, end, n_steps)
    run = {"format_version": S.FORMAT_VERSION, "kvprof_version": "bench",
           "kv": {"block_size": BLOCK_SIZE, "bytes_per_block": 2 * 2 * 8 * 128 * BLOCK_SIZE * 2,
                  "usable_blocks": 40_000, "num_blocks": 40_001},
           "engine": {"max_num_seqs": n_slots, "max_num_batched_tokens": 8192}}
    forward = {"step": steps["step"], "rank": 0, "t_start_ns": steps["t_schedule_end_ns"],
               "t_end_ns": steps["t_update_start_ns"], "device_ns": None,
               "rss_bytes": 2 * 2**30 + 4096 * steps["step"], "hook_ns": 20_000,
               "gpu_used_bytes": None, "torch_allocated_bytes": None, "torch_reserved_bytes": None,
               "torch_peak_bytes": None, "dev_gemm_ns": None, "dev_attention_ns": None,
               "dev_comm_ns": None, "dev_memcpy_ns": None, "dev_other_ns": None, "dev_records": None}
    counts = {"steps": n_steps, "request_steps": rows["step"].size,
              "requests": requests["req"].size, "forward": n_steps}
    write_trace(path, {"steps": steps, "request_steps": rows, "requests": requests,
                       "forward": forward}, counts, run)
    return {k: v for k, v in counts.items() if k != "forward"}


# ------------------------------------------------------------------ the contenders
def files_of(path: str) -> dict[str, str]:
    parts = parts_dir(path)
    return {"steps": path, "requests": os.path.join(parts, "requests.arrow"),
            "request_steps": os.path.join(parts, "request_steps.arrow")}


def time_kernels(path: str, repeat: int) -> tuple[float, float, dict]:
    """(best kernel seconds, best analyze() seconds incl. reading, the JSON report)."""
    from kvprof.analysis import NEEDED_TABLES, _columns, analyze, load_kernels, replay
    from kvprof.format.reader import read_trace
    load_kernels()          # numba's import and cache load are timed in (b), not here
    best_kernel = best_all = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        trace = read_trace(path, tables=NEEDED_TABLES)
        report = analyze(trace).to_dict()
        best_all = min(best_all, time.perf_counter() - t0)
        steps = _columns(trace["steps"])
        requests = _columns(trace["requests"], ("req", "finish_ns", "prompt_tokens", "output_tokens"))
        mask, chosen = np.ones(steps["step"].size, bool), requests["finish_ns"] >= 0
        replay(trace, steps, requests, mask, chosen)     # warm: arrays and code in cache
        t0 = time.perf_counter()
        replay(trace, steps, requests, mask, chosen)
        best_kernel = min(best_kernel, time.perf_counter() - t0)
    return best_kernel, best_all, report


def time_cli(path: str, cache_dir: str) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kvprof", "analyze", path, "--json"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    return wall


DUCKDB_SQL = """
WITH rs AS (
  SELECT r.req, r.step, r.computed + r.tokens AS ctx, q.prompt_tokens AS prompt, s.t_update_end_ns AS t,
         max(r.computed + r.tokens) OVER (PARTITION BY r.req ORDER BY r.step
             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_max
  FROM rs_tbl r JOIN req_tbl q USING (req) JOIN steps_tbl s USING (step)),
samples AS (SELECT req, t FROM rs WHERE ctx >= prompt AND ctx > coalesce(prev_max, -1)),
gaps AS (SELECT s.req, t - lag(t) OVER (PARTITION BY s.req ORDER BY t) AS gap
         FROM samples s JOIN req_tbl q USING (req) WHERE q.finish_ns >= 0)
SELECT (SELECT count(*) FROM samples) AS output_tokens,
       avg(gap) / 1e6, quantile_cont(gap, 0.5) / 1e6, quantile_cont(gap, 0.9) / 1e6,
       quantile_cont(gap, 0.99) / 1e6
FROM gaps WHERE gap IS NOT NULL
"""

DUCKDB_REQUESTS_SQL = """
SELECT {cols},
       (SELECT sum(prompt_tokens) FROM req_tbl WHERE first_scheduled_step >= 0) AS input_tokens,
       count(*) AS finished,
       (SELECT max(t_update_end_ns) - min(t_schedule_start_ns) FROM steps_tbl) / 1e9 AS duration_s
FROM (SELECT *, (first_token_ns - arrival_ns) / 1e6 AS ttft, (finish_ns - arrival_ns) / 1e6 AS e2e,
             (first_scheduled_ns - queued_ns) / 1e6 AS queue,
             CASE WHEN output_tokens >= 2 THEN (finish_ns - first_token_ns) / 1e6 / (output_tokens - 1)
             END AS tpot
      FROM req_tbl WHERE finish_ns >= 0)
"""


def latency_columns_sql() -> str:
    parts = []
    for kind in ("ttft", "tpot", "e2e", "queue"):
        parts += [f"avg({kind})"] + [f"quantile_cont({kind}, {q})" for q in (0.5, 0.9, 0.99)]
    return ", ".join(parts)


def time_duckdb(path: str) -> tuple[float, dict]:
    import duckdb
    import pyarrow.ipc as ipc
    t0 = time.perf_counter()
    tables = {name: ipc.open_stream(f).read_all() for name, f in files_of(path).items()}
    con = duckdb.connect()
    con.register("steps_tbl", tables["steps"].select(["step", "t_schedule_start_ns", "t_update_end_ns"]))
    con.register("req_tbl", tables["requests"])
    con.register("rs_tbl", tables["request_steps"])
    itl = con.execute(DUCKDB_SQL).fetchone()
    req = con.execute(DUCKDB_REQUESTS_SQL.format(cols=latency_columns_sql())).fetchone()
    wall = time.perf_counter() - t0
    return wall, {"output_tokens": itl[0], "itl_p50": itl[2], "itl_p99": itl[4], "ttft_p99": req[3],
                  "tpot_mean": req[4], "input_tokens": req[16]}


def time_polars(path: str) -> tuple[float, dict]:
    import polars as pl
    t0 = time.perf_counter()
    files = files_of(path)
    steps = pl.read_ipc_stream(files["steps"], columns=["step", "t_schedule_start_ns", "t_update_end_ns"])
    req = pl.read_ipc_stream(files["requests"])
    rs = pl.read_ipc_stream(files["request_steps"], columns=["step", "req", "tokens", "computed"])
    ctx = pl.col("computed") + pl.col("tokens")
    samples = (rs.join(req.select("req", "prompt_tokens", "finish_ns"), on="req")
               .join(steps.select("step", "t_update_end_ns"), on="step")
               .sort("req", "step")
               .with_columns(ctx.alias("ctx"),
                             ctx.cum_max().shift(1).over("req").fill_null(-1).alias("prev_max"))
               .filter((pl.col("ctx") >= pl.col("prompt_tokens")) & (pl.col("ctx") > pl.col("prev_max"))))
    gaps = (samples.filter(pl.col("finish_ns") >= 0)
            .with_columns(pl.col("t_update_end_ns").diff().over("req").alias("gap"))
            .drop_nulls("gap")["gap"] / 1e6)
    itl = (samples.height, gaps.mean(), *[gaps.quantile(q, "linear") for q in (0.5, 0.9, 0.99)])
    done = req.filter(pl.col("finish_ns") >= 0).with_columns(
        ((pl.col("first_token_ns") - pl.col("arrival_ns")) / 1e6).alias("ttft"),
        ((pl.col("finish_ns") - pl.col("arrival_ns")) / 1e6).alias("e2e"),
        ((pl.col("first_scheduled_ns") - pl.col("queued_ns")) / 1e6).alias("queue"),
        pl.when(pl.col("output_tokens") >= 2)
          .then((pl.col("finish_ns") - pl.col("first_token_ns")) / 1e6 / (pl.col("output_tokens") - 1))
          .alias("tpot"))
    aggs = [e for k in ("ttft", "tpot", "e2e", "queue")
            for e in [pl.col(k).mean().alias(f"{k}_mean")]
            + [pl.col(k).quantile(q, "linear").alias(f"{k}_{q}") for q in (0.5, 0.9, 0.99)]]
    lat = done.select(aggs).row(0, named=True)
    totals = (req.filter(pl.col("first_scheduled_step") >= 0)["prompt_tokens"].sum(),
              steps["t_update_end_ns"].max() - steps["t_schedule_start_ns"].min())
    wall = time.perf_counter() - t0
    return wall, {"output_tokens": itl[0], "itl_p50": itl[2], "itl_p99": itl[4],
                  "ttft_p99": lat["ttft_0.99"], "tpot_mean": lat["tpot_mean"], "input_tokens": totals[0]}


def kvprof_answers(report: dict) -> dict:
    lat = report["latency_ms"]
    return {"output_tokens": report["tokens"]["output"], "itl_p50": lat["itl"]["p50"],
            "itl_p99": lat["itl"]["p99"], "ttft_p99": lat["ttft"]["p99"],
            "tpot_mean": lat["tpot"]["mean"], "input_tokens": report["tokens"]["input"]}


def agree(mine: dict, theirs: dict) -> bool:
    return all(abs(mine[k] - theirs[k]) <= 1e-6 * max(abs(mine[k]), 1) for k in mine)


# ------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--seqs", type=int, default=64, help="running sequences per step")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", help="build the trace in this folder and keep it")
    args = p.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="kvprof-bench-")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "bench.arrow")
    cache = tempfile.mkdtemp(prefix="kvprof-numba-")
    try:
        run(args, path, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def run(args, path: str, cache: str) -> None:
    t0 = time.perf_counter()
    counts = build_trace(path, args.rows, args.seqs)
    n = counts["request_steps"]
    size = sum(os.path.getsize(f) for f in files_of(path).values())
    print(f"trace: {counts} in {time.perf_counter() - t0:.1f} s, {size / n:.2f} bytes per "
          f"request-step row on disk")
    cold = time_cli(path, cache)
    warm = min(time_cli(path, cache) for _ in range(args.repeat))
    os.environ["NUMBA_CACHE_DIR"] = cache
    kernel_s, analyze_s, report = time_kernels(path, args.repeat)
    duck = [time_duckdb(path) for _ in range(args.repeat)]
    pol = [time_polars(path) for _ in range(args.repeat)]
    duck_s, polars_s = min(t for t, _ in duck), min(t for t, _ in pol)
    mine = kvprof_answers(report)
    print(f"(a) kernel: {kernel_s:.3f} s = {n / kernel_s / 1e6:.1f} M rows/s; analyze() in memory "
          f"incl. reading: {analyze_s:.3f} s = {n / analyze_s / 1e6:.1f} M rows/s")
    print(f"(b) kvprof analyze --json process: cold (JIT) {cold:.2f} s, warm {warm:.2f} s")
    print(f"(c) duckdb: {duck_s:.3f} s = {n / duck_s / 1e6:.1f} M rows/s; polars: {polars_s:.3f} s "
          f"= {n / polars_s / 1e6:.1f} M rows/s (same aggregates, reading included)")
    print(f"    same answers: duckdb {agree(mine, duck[0][1])}, polars {agree(mine, pol[0][1])} "
          f"(output tokens {mine['output_tokens']}, ITL p50 {mine['itl_p50']:.3f} ms, "
          f"TTFT p99 {mine['ttft_p99']:.3f} ms)")
    print(f"analyze: {n / kernel_s:.0f} rows/s; vs duckdb: {duck_s / analyze_s:.1f}x; "
          f"vs polars: {polars_s / analyze_s:.1f}x; cold start: {cold:.2f} s")


if __name__ == "__main__":
    main()
