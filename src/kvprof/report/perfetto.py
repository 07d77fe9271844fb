"""A trace as Chrome trace-event JSON, the format ui.perfetto.dev and chrome://tracing open.

Pure: ``events(trace, ...)`` turns a read trace into a list of trace events; the
command (cli/export.py) estimates their size and writes them. Tracks, and what
each slice and counter carries: docs/analyses.md ("Timeline export").
Times are microseconds from the trace's first event, on the trace's clock.
"""
from __future__ import annotations

import json

from kvprof.format import schema as S

ENGINE_PID, REQUESTS_PID, WORKER_PID0 = 1, 2, 10
SCHED_TID, OUTPUT_TID, STEPS_TID = 1, 2, 3      # EngineCore threads (tracks)
FORWARD_TID, DEVICE_TID = 1, 2                  # worker threads
SAMPLE_TID0 = 100                               # py-spy threads, in their process
STEP_ARGS = tuple(f.name for f in S.STEPS if not f.name.startswith("t_"))
_STACK_DEPTH = 12                               # frames shown in a sample's args


def events(trace, window: tuple[float | None, float | None] | None = None, every: int = 1) -> list[dict]:
    """All trace events of ``trace``: steps in ``window`` (seconds from the first step, end
    excluded) and, of those, every ``every``-th step number; requests that overlap them."""
    steps = _rows(trace["steps"])
    if not steps:
        return []
    first = steps[0]["t_schedule_start_ns"]
    keep = [s for s in steps if _in_window(s["t_schedule_start_ns"] - first, window)
            and s["step"] % every == 0]
    span = _span(keep, window)
    origin = _origin(trace, first)
    us = lambda t: (t - origin) / 1000.0   # noqa: E731
    out = _metadata(trace)
    out += step_events(keep, us)
    out += worker_events(_rows(trace["forward"]), {s["step"] for s in keep}, us)
    out += request_events(trace, steps, span, us)
    if "host_samples" in trace.tables and trace["host_samples"].num_rows:
        out += sample_events(trace, span, us)
    return out


def _in_window(rel_ns: int, window) -> bool:
    if window is None:
        return True
    lo, hi = window
    return (lo is None or rel_ns >= lo * 1e9) and (hi is None or rel_ns < hi * 1e9)


def _span(keep: list, window) -> tuple[int, int]:
    """The time span the export covers: the selected steps' (all time without a window)."""
    if window is None or not keep:
        return (-2**62, 2**62) if window is None else (0, -1)
    return keep[0]["t_schedule_start_ns"], keep[-1]["t_update_end_ns"]


def _origin(trace, first_step_ns: int) -> int:
    arrivals = [t for t in trace["requests"].column("arrival_ns").to_pylist() if t >= 0] \
        if "requests" in trace.tables else []
    return min([first_step_ns, *arrivals])


def _rows(table) -> list[dict]:
    return table.to_pylist()


# ------------------------------------------------------------------- tracks
def _meta(pid: int, tid: int | None, kind: str, name: str) -> dict:
    ev = {"ph": "M", "pid": pid, "tid": tid or 0, "name": kind, "args": {"name": name}}
    return ev


def _metadata(trace) -> list[dict]:
    ends = trace.end_records
    engine_pid = ends.get("engine_core", {}).get("pid")
    out = [_meta(ENGINE_PID, None, "process_name", f"EngineCore (pid {engine_pid})" if engine_pid else "EngineCore"),
           {"ph": "M", "pid": ENGINE_PID, "tid": 0, "name": "process_sort_index", "args": {"sort_index": 0}},
           _meta(ENGINE_PID, SCHED_TID, "thread_name", "scheduling"),
           _meta(ENGINE_PID, OUTPUT_TID, "thread_name", "output processing"),
           _meta(ENGINE_PID, STEPS_TID, "thread_name", "steps"),
           _meta(REQUESTS_PID, None, "process_name", "Requests"),
           {"ph": "M", "pid": REQUESTS_PID, "tid": 0, "name": "process_sort_index", "args": {"sort_index": 1}}]
    for rank in sorted(set(trace["forward"].column("rank").to_pylist())):
        pid = ends.get(f"worker-{rank}", {}).get("pid")
        out += [_meta(WORKER_PID0 + rank, None, "process_name",
                      f"Worker {rank} (pid {pid})" if pid else f"Worker {rank}"),
                {"ph": "M", "pid": WORKER_PID0 + rank, "tid": 0, "name": "process_sort_index",
                 "args": {"sort_index": 2 + rank}},
                _meta(WORKER_PID0 + rank, FORWARD_TID, "thread_name", "forward"),
                _meta(WORKER_PID0 + rank, DEVICE_TID, "thread_name", "device time")]
    return out


def _slice(pid, tid, name, t0, t1, us, args=None, cat="step") -> dict:
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "cat": cat, "ts": us(t0),
            "dur": max(t1 - t0, 0) / 1000.0, "args": args or {}}


def _counter(pid, name, t, us, values: dict) -> dict:
    return {"ph": "C", "pid": pid, "tid": 0, "name": name, "ts": us(t), "args": values}


# -------------------------------------------------------------------- steps
def step_events(steps: list[dict], us) -> list[dict]:
    """Schedule and update slices, a whole-step slice with the composition, and counters."""
    out = []
    lanes: list[int] = []   # end of the last step slice per lane (async scheduling overlaps)
    for s in steps:
        n, args = s["step"], {k: s[k] for k in STEP_ARGS}
        out.append(_slice(ENGINE_PID, SCHED_TID, f"schedule {n}", s["t_schedule_start_ns"],
                          s["t_schedule_end_ns"], us, args))
        out.append(_slice(ENGINE_PID, OUTPUT_TID, f"update {n}", s["t_update_start_ns"],
                          s["t_update_end_ns"], us, {"step": n, "finished": s["finished"],
                                                     "blocks_freed": s["blocks_freed"]}))
        lane = next((i for i, end in enumerate(lanes) if end <= s["t_schedule_start_ns"]), len(lanes))
        lanes[lane:lane + 1] = [s["t_update_end_ns"]]
        out.append(_slice(ENGINE_PID, STEPS_TID + 10 * lane, f"step {n}", s["t_schedule_start_ns"],
                          s["t_update_end_ns"], us, args))
        t_sched, t_end = s["t_schedule_end_ns"], s["t_update_end_ns"]
        out += [_counter(ENGINE_PID, "requests", t_sched, us,
                         {"running": s["num_running"], "waiting": s["num_waiting"]}),
                _counter(ENGINE_PID, "scheduled tokens", t_sched, us,
                         {"prefill": s["prefill_tokens"], "decode": s["decode_tokens"]}),
                _counter(ENGINE_PID, "KV blocks", t_end, us,
                         {"used": s["kv_blocks_used"], "cached": s["kv_blocks_cached"]}),
                _counter(ENGINE_PID, "EngineCore memory", t_end, us, {"rss_bytes": s["rss_bytes"]})]
    for lane in range(1, len(lanes)):
        out.append(_meta(ENGINE_PID, STEPS_TID + 10 * lane, "thread_name", f"steps (overlapping, {lane})"))
    return out


_WORKER_MEMORY = ("rss_bytes", "gpu_used_bytes", "torch_allocated_bytes", "torch_reserved_bytes")


def worker_events(forward: list[dict], steps: set, us) -> list[dict]:
    """Forward slices per worker, device time where measured, and the worker's memory."""
    out = []
    device_end: dict[int, int] = {}
    for f in sorted(forward, key=lambda r: (r["rank"], r["t_start_ns"])):
        if f["step"] not in steps:
            continue
        pid = WORKER_PID0 + f["rank"]
        args = {"step": f["step"], "hook_ns": f["hook_ns"], "device_ns": f["device_ns"]}
        out.append(_slice(pid, FORWARD_TID, f"forward {f['step']}", f["t_start_ns"], f["t_end_ns"], us, args))
        if f["device_ns"] is not None:   # its length is measured; its place is the host start
            t0 = max(f["t_start_ns"], device_end.get(pid, 0))
            device_end[pid] = t0 + f["device_ns"]
            out.append(_slice(pid, DEVICE_TID, f"device {f['step']}", t0, t0 + f["device_ns"], us,
                              {"step": f["step"], "device_ns": f["device_ns"]}))
        values = {k: f[k] for k in _WORKER_MEMORY if f[k] is not None}
        out.append(_counter(pid, "worker memory", f["t_end_ns"], us, values))
    return out


# ----------------------------------------------------------------- requests
_PHASE_LABEL = {S.PHASE_PREFILL: "prefill", S.PHASE_CHUNKED: "prefill chunk",
                S.PHASE_RESUMED: "resumed", S.PHASE_RECOMPUTE: "recompute"}


def request_events(trace, steps: list[dict], span: tuple[int, int], us) -> list[dict]:
    """One async slice per request (arrival to finish) holding queued, prefill chunks,
    decode, preempted and resumed slices; nested and ordered for each request's track."""
    by_step = {s["step"]: s for s in steps}
    end_ns = steps[-1]["t_update_end_ns"]
    rows: dict[int, list] = {}
    for r in _rows(trace["request_steps"]):
        if r["phase"] != S.PHASE_DECODE and r["step"] in by_step:
            rows.setdefault(r["req"], []).append(r)
    preempted: dict[int, list] = {}
    for p in _rows(trace["preemptions"]):
        preempted.setdefault(p["req"], []).append(p)
    out = []
    for req in _rows(trace["requests"]):
        start = req["arrival_ns"] if req["arrival_ns"] >= 0 else req["queued_ns"]
        finish = req["finish_ns"] if req["finish_ns"] >= 0 else end_ns
        if start < 0 or finish < span[0] or start > span[1]:
            continue
        children = _request_children(req, rows.get(req["req"], []), preempted.get(req["req"], []),
                                     by_step, finish)
        out += _async_tree(req["req"], req["request_id"], start, finish, children, us,
                           {"prompt_tokens": req["prompt_tokens"], "output_tokens": req["output_tokens"],
                            "cached_prompt_tokens": req["cached_prompt_tokens"],
                            "preemptions": req["preemptions"], "finish_reason": req["finish_reason"]})
    return out


def _request_children(req: dict, rows: list, preemptions: list, by_step: dict, finish: int) -> list:
    """(name, start, end, args, grandchildren) in time order."""
    first_sched = req["first_scheduled_ns"]
    top = []
    if first_sched >= 0:
        top.append(("queued", req["arrival_ns"] if req["arrival_ns"] >= 0 else req["queued_ns"],
                    first_sched, {}, []))
    resumes = sorted(by_step[r["step"]]["t_schedule_start_ns"] for r in rows if r["phase"] == S.PHASE_RESUMED)
    pieces = [(_PHASE_LABEL[r["phase"]], by_step[r["step"]]["t_schedule_start_ns"],
               by_step[r["step"]]["t_update_end_ns"],
               {"step": r["step"], "tokens": r["tokens"], "computed": r["computed"]}, [])
              for r in sorted(rows, key=lambda r: r["step"])]
    for p in preemptions:
        resume = next((t for t in resumes if t >= p["t_ns"]), finish)
        pieces.append(("preempted", p["t_ns"], resume, {"step": p["step"], "computed_tokens": p["computed_tokens"],
                                                        "blocks_freed": p["blocks_freed"]}, []))
    pieces.sort(key=lambda c: c[1])
    first_token = req["first_token_ns"]
    if first_token < 0:
        return top + pieces
    before = [c for c in pieces if c[1] < first_token]
    after = [c for c in pieces if c[1] >= first_token]
    decode_start = max([first_token] + [c[2] for c in before])
    return top + before + [("decode", decode_start, finish, {"first_token_step": req["first_token_step"]}, after)]


def _async_tree(req: int, name: str, t0: int, t1: int, children: list, us, args: dict) -> list[dict]:
    """b/e pairs, depth first: children clipped into their parent and after their elder sibling,
    so every request's track nests and its times never go back."""
    ident = str(req)
    out = [{"ph": "b", "pid": REQUESTS_PID, "tid": 0, "cat": "request", "id": ident, "name": name,
            "ts": us(t0), "args": args}]
    cursor = t0
    for cname, c0, c1, cargs, grand in children:
        c0 = min(max(c0, cursor), t1)
        c1 = min(max(c1, c0), t1)
        inner = _async_tree(req, cname, c0, c1, grand, us, cargs)
        out += inner
        cursor = c1
    out.append({"ph": "e", "pid": REQUESTS_PID, "tid": 0, "cat": "request", "id": ident, "name": name,
                "ts": us(t1), "args": {}})
    return out


# ------------------------------------------------------------------ py-spy
def sample_events(trace, span: tuple[int, int], us) -> list[dict]:
    """One slice per run of one stack, on a track per sampled thread of its process."""
    from kvprof.analysis.host import PARTS, classify_frames, classify_stack
    import numpy as np

    frames = _rows(trace["host_frames"])
    size = max((f["frame"] for f in frames), default=-1) + 1
    names, files, lines = [""] * size, [""] * size, [0] * size
    for f in frames:
        names[f["frame"]], files[f["frame"]], lines[f["frame"]] = f["function"], f["file"], f["line"]
    part_of = classify_frames(names, files)
    is_output = np.array([n.rsplit(".", 1)[-1] == "update_from_output" for n in names], dtype=bool)
    pids = {"engine_core": ENGINE_PID}
    tids: dict[tuple, int] = {}
    out = []
    for s in _rows(trace["host_samples"]):
        t0, t1 = s["t_ns"], s["t_ns"] + s["duration_ns"]
        pid = pids.get(s["process"]) or _worker_pid(s["process"])
        if pid is None or t1 < span[0] or t0 > span[1]:
            continue
        key = (pid, s["tid"])
        if key not in tids:
            tids[key] = SAMPLE_TID0 + sum(1 for k in tids if k[0] == pid)
            out.append(_meta(pid, tids[key], "thread_name", f"py-spy: {s['thread']} ({s['tid']})"))
        stack = [f for f in s["stack"] if 0 <= f < size]
        leaf = names[stack[0]] if stack else "?"
        part = PARTS[classify_stack(stack, part_of, is_output)]
        frames_text = [f"{names[f]} ({files[f]}:{lines[f]})" for f in stack[:_STACK_DEPTH]]
        out.append(_slice(pid, tids[key], leaf, t0, t1, us, {"part": part, "stack": frames_text}, cat="py-spy"))
    return out


def _worker_pid(process: str) -> int | None:
    head, _, rank = process.partition("-")
    return WORKER_PID0 + int(rank) if head == "worker" and rank.isdigit() else None


# -------------------------------------------------------------- the file
def estimate_bytes(evs: list[dict], probe: int = 2000) -> int:
    """The JSON size, from the serialised size of a spread sample of the events."""
    if not evs:
        return len('{"traceEvents": []}')
    stride = max(1, len(evs) // probe)
    picked = evs[::stride]
    per_event = sum(len(json.dumps(e, separators=(",", ":"))) + 1 for e in picked) / len(picked)
    return int(per_event * len(evs)) + 64


def write(evs: list[dict], out, metadata: dict | None = None) -> int:
    """Write the JSON object form (``traceEvents``); returns the bytes written."""
    text = json.dumps({"traceEvents": evs, "displayTimeUnit": "ms", "otherData": metadata or {}},
                      separators=(",", ":"))
    out.write(text)
    return len(text)
