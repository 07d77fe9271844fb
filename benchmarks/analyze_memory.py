"""Peak memory and wall time of ``kvprof analyze --json`` on traces of any length.

    python benchmarks/analyze_memory.py --rows 100000000 [--seqs 64] [--base-rows 2000000]
                                        [--ranks 1] [--in-memory] [--keep DIR]

A trace of ``--rows`` request-step rows is written through kvprof's own writer by
tiling one base trace (analyze_speed.py's generator, ``--base-rows`` rows) end to end:
tile k has its steps, requests and times shifted past tile k-1, so the trace is as
long as asked while the generator holds only the base in memory. Then, each in a
fresh process, with the numba cache warm:
  * ``kvprof analyze --json`` (request_steps and steps streamed from disk);
  * with ``--in-memory``: ``analyze(read_trace(path))``, every table in memory (the
    path before streaming), and whether its JSON report equals the streamed one.
Peak resident memory is the process's own high-water mark (getrusage ru_maxrss).
Each line: rows, steps, size on disk, wall, peak MB, rows/s, and the peak above the
floor (the same command on a 20,000-row trace: imports, numba) per step.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import analyze_speed as base  # noqa: E402  (the synthetic generator)

from kvprof.format import schema as S  # noqa: E402
from kvprof.recorder.session import TraceSession, parts_dir, prepare_target  # noqa: E402

STEP_TIMES = ("t_schedule_start_ns", "t_schedule_end_ns", "t_update_start_ns", "t_update_end_ns")
REQUEST_TIMES = ("arrival_ns", "queued_ns", "first_scheduled_ns", "first_token_ns", "finish_ns")
REQUEST_STEPS = ("first_scheduled_step", "first_token_step", "finish_step")

STREAMED = """
import json, resource, sys, time
t0 = time.perf_counter()
from kvprof.cli.main import main
code = main(["analyze", sys.argv[1], "--json"])
sys.stdout.flush()
print(json.dumps({"rc": code, "wall_s": time.perf_counter() - t0,
                  "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
      file=sys.stderr)
"""
IN_MEMORY = """
import json, resource, sys, time
t0 = time.perf_counter()
from kvprof.analysis import NEEDED_TABLES, analyze
from kvprof.format.reader import read_trace
from kvprof.report.json_report import render
print(render(analyze(read_trace(sys.argv[1], NEEDED_TABLES))))
print(json.dumps({"rc": 0, "wall_s": time.perf_counter() - t0,
                  "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
      file=sys.stderr)
"""


def base_tables(n_rows: int, n_slots: int) -> tuple[dict, dict]:
    """analyze_speed's tables for one tile, and their row counts."""
    rng = np.random.default_rng(0)
    n_steps = max(n_rows // n_slots, 2)
    req = base.slot_requests(rng, n_steps, n_slots)
    rows = base.slot_rows(req, n_steps, n_slots)
    steps, start, end = base.steps_table(rows, n_steps, rng)
    requests = base.requests_table(req, rows, start, end, n_steps)
    requests["request_id"] = np.arange(len(requests["request_id"]))   # named per tile below
    forward = {"step": steps["step"], "rank": 0, "t_start_ns": steps["t_schedule_end_ns"],
               "t_end_ns": steps["t_update_start_ns"], "rss_bytes": 2 * 2**30, "hook_ns": 20_000}
    tables = {"steps": steps, "request_steps": rows, "requests": requests, "forward": forward}
    counts = {"steps": n_steps, "request_steps": rows["step"].size,
              "requests": requests["req"].size, "forward": n_steps}
    return tables, counts


def shifted(table: str, cols: dict, k: int, n_steps: int, n_req: int, span_ns: int) -> dict:
    """Tile ``k`` of a table: step numbers, request indices and times moved past tile k-1."""
    out = dict(cols)
    if "step" in cols:
        out["step"] = np.asarray(cols["step"], np.int64) + k * n_steps
    for name in STEP_TIMES + ("t_start_ns", "t_end_ns"):
        if name in cols:
            out[name] = np.asarray(cols[name], np.int64) + k * span_ns
    if table in ("request_steps", "requests"):
        out["req"] = np.asarray(cols["req"], np.int64) + k * n_req
    if table == "requests":
        for name in REQUEST_TIMES:
            out[name] = np.where(cols[name] >= 0, cols[name] + k * span_ns, -1)
        for name in REQUEST_STEPS:
            out[name] = np.where(cols[name] >= 0, cols[name] + k * n_steps, -1)
        out["request_id"] = [f"bench-{k}-{i}" for i in cols["request_id"]]
    return out


def sliced(cols: dict, lo: int, hi: int) -> dict:
    return {name: v if np.isscalar(v) or v is None else v[lo:hi] for name, v in cols.items()}


def write_tiled(path: str, n_rows: int, n_slots: int, base_rows: int, ranks: int = 1) -> dict:
    """A trace of about ``n_rows`` request-step rows, written tile by tile; ``ranks``
    workers each write a forward file (rank r starts its forwards r us late)."""
    tables, counts = base_tables(min(base_rows, n_rows), n_slots)
    tiles = max(1, round(n_rows / counts["request_steps"]))
    steps = tables["steps"]
    span = int(steps["t_update_end_ns"][-1] - steps["t_schedule_start_ns"][0]) + 50_000
    run = {"format_version": S.FORMAT_VERSION, "kvprof_version": "bench",
           "kv": {"block_size": base.BLOCK_SIZE, "bytes_per_block": 2 * 2 * 8 * 128 * base.BLOCK_SIZE * 2,
                  "usable_blocks": 40_000, "num_blocks": 40_001},
           "engine": {"max_num_seqs": n_slots, "max_num_batched_tokens": 8192}}
    prepare_target(path, overwrite=True)
    parts = parts_dir(path)
    files = {t: path if t == "steps" else os.path.join(parts, S.PART_FILES[t])
             for t in ("steps", "request_steps", "requests", "preemptions", "block_events", "prompts")}
    # Every batch may wait in the queue (nothing dropped); each is built, shifted, when the
    # writer takes it, so the queue holds closures over the base tables, not rows.
    pending = tiles * sum(n // base.FLUSH_ROWS + 1 for n in counts.values()) + 8
    engine = TraceSession(path, files, "engine_core", run, max_pending=pending,
                          max_pending_rows=tiles * sum(counts.values()) + 1)
    workers = [TraceSession(path, {"forward": os.path.join(parts, S.forward_file(r))},
                            f"worker-{r}", run, max_pending=pending,
                            max_pending_rows=tiles * counts["forward"] + 1) for r in range(ranks)]
    per_rank = [{**tables["forward"], "rank": r,
                 "t_start_ns": np.asarray(tables["forward"]["t_start_ns"]) + 1_000 * r}
                for r in range(ranks)]
    for k in range(tiles):
        for table, cols, session in ([(t, c, engine) for t, c in tables.items() if t != "forward"]
                                     + [("forward", f, w) for f, w in zip(per_rank, workers)]):
            for lo in range(0, counts[table], base.FLUSH_ROWS):
                hi = min(lo + base.FLUSH_ROWS, counts[table])
                build = lambda t=table, c=cols, a=lo, b=hi, k=k: base.record_batch(  # noqa: E731
                    t, shifted(t, sliced(c, a, b), k, counts["steps"], counts["requests"], span),
                    0, b - a)
                assert session.writer.submit(table, build, hi - lo), "writer queue full"
    total = {t: n * tiles for t, n in counts.items()}
    for session, extra in ((engine, {"kv_blocks_used_at_start": 0, "steps": total["steps"]}),
                           *((w, None) for w in workers)):
        assert session.writer.wait_idle(3600), "the writer did not drain in an hour"
        record = session.close(extra=extra) if extra else session.close()
        assert record["complete"] and not record["rows_dropped"], record
    return total


def measure(script: str, path: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0 and stats["rc"] == 0, proc.stderr[-2000:]
    return stats, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--seqs", type=int, default=64, help="running sequences per step")
    p.add_argument("--base-rows", type=int, default=2_000_000, help="rows of the tiled base trace")
    p.add_argument("--in-memory", action="store_true", help="also the in-memory path, compared")
    p.add_argument("--ranks", type=int, default=1, help="worker ranks, one forward file each")
    p.add_argument("--keep", help="write the trace in this folder and keep it (reused if there)")
    args = p.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="kvprof-mem-")
    os.makedirs(folder, exist_ok=True)
    ranks = f"-tp{args.ranks}" if args.ranks > 1 else ""
    path = os.path.join(folder, f"tiled-{args.rows}-{args.seqs}{ranks}.arrow")
    try:
        t0 = time.perf_counter()
        if not os.path.exists(path):
            counts = write_tiled(path, args.rows, args.seqs, args.base_rows, args.ranks)
            print(f"trace: {counts} written in {time.perf_counter() - t0:.1f} s")
        tiny = os.path.join(folder, "tiny.arrow")
        write_tiled(tiny, 20_000, args.seqs, 20_000, args.ranks)
        measure(STREAMED, tiny)                        # numba's cache warm for what follows
        floor = {"streamed": measure(STREAMED, tiny)[0]["peak_bytes"],
                 "in memory": measure(IN_MEMORY, tiny)[0]["peak_bytes"]}
        print(f"floor (a {20_000:,}-row trace): streamed {floor['streamed'] / 2**20:.0f} MB, "
              f"in memory {floor['in memory'] / 2**20:.0f} MB peak")
        streamed = measure(STREAMED, path)
        report(path, "streamed", *streamed, floor["streamed"])
        if args.in_memory:
            stats, out = measure(IN_MEMORY, path)
            report(path, "in memory", stats, out, floor["in memory"])
            print(f"in-memory report == streamed report: {json.loads(out) == json.loads(streamed[1])}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def rows_written(path: str) -> int:
    """request_steps rows, from the writers' end records."""
    from kvprof.format.reader import read_trace
    return read_trace(path, ("requests",)).end_records["engine_core"]["rows_written"]["request_steps"]


def report(path: str, label: str, stats: dict, out: str, floor: int) -> None:
    steps, rows = json.loads(out)["steps"], rows_written(path)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path + S.PARTS_SUFFIX)
               for f in files) + os.path.getsize(path)
    print(f"{label}: {rows:,} rows, {steps:,} steps, {size / 2**20:.0f} MB on disk: "
          f"{stats['wall_s']:.2f} s, {stats['peak_bytes'] / 2**20:.0f} MB peak, "
          f"{rows / stats['wall_s'] / 1e6:.0f} M rows/s, "
          f"{(stats['peak_bytes'] - floor) / steps:.0f} bytes/step above the floor")


if __name__ == "__main__":
    main()
