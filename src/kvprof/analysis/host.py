"""Where a step's host time goes: py-spy's stacks (host_samples) joined to the steps.

Each run of one stack (a host_samples row) is cut by the step windows of its
process (the EngineCore: schedule start to update end; a worker: its forward) and
its time inside them is given to one part of the engine, from the innermost frame
that names one (rules below; docs/analyses.md). Only the thread that runs the
steps (``MainThread``) is counted: the shares of a process sum to 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

PARTS = ("scheduler", "kv_cache_manager", "model_runner", "io_processing", "kvprof", "other")
STEP_THREAD = "MainThread"

# (part, substring of the frame's file); the first rule that matches the innermost
# frame that any rule matches decides.
_FILE_RULES = (
    ("kvprof", "/kvprof/"),
    ("scheduler", "/vllm/v1/core/sched/"),
    ("kv_cache_manager", "/vllm/v1/core/"),
    ("io_processing", "/vllm/v1/serial_utils.py"),
    ("io_processing", "/vllm/v1/engine/output_processor.py"),
    ("io_processing", "/vllm/v1/engine/input_processor.py"),
    ("io_processing", "/vllm/v1/engine/processor.py"),
    ("io_processing", "/vllm/v1/engine/detokenizer.py"),
    ("io_processing", "/vllm/v1/outputs.py"),
    ("model_runner", "/vllm/v1/worker/"),
    ("model_runner", "/vllm/v1/executor/"),
    ("model_runner", "/vllm/executor/"),
    ("model_runner", "/vllm/model_executor/"),
    ("model_runner", "/vllm/v1/attention/"),
    ("model_runner", "/vllm/attention/"),
    ("model_runner", "/vllm/v1/sample/"),
    ("model_runner", "/vllm/distributed/"),
    ("model_runner", "/vllm/forward_context.py"),
)
# EngineCore functions that move requests in and outputs out (core.py)
_IO_FUNCTIONS = ("_process_input_queue", "process_input_sockets", "process_output_sockets",
                 "_handle_client_request", "preprocess_add_request", "add_request")
# The scheduler's code under update_from_output turns model outputs into request outputs.
_OUTPUT_FUNCTION = "update_from_output"


@dataclass
class ProcessHostTime:
    """One process's step time, split by part of the engine."""

    process: str
    window: str                 # "step" (EngineCore) or "forward" (worker)
    window_ns: int              # total length of its step windows
    sampled_ns: int             # time of its step thread's stacks inside them
    ns: dict[str, int]

    @property
    def shares(self) -> dict[str, float]:
        total = sum(self.ns.values())
        return {part: (v / total if total else 0.0) for part, v in self.ns.items()}

    def to_dict(self) -> dict:
        return {"window": self.window, "window_ns": self.window_ns, "sampled_ns": self.sampled_ns,
                "coverage": self.sampled_ns / self.window_ns if self.window_ns else 0.0,
                "ns": dict(self.ns), "shares": self.shares}


@dataclass
class HostTime:
    rate_hz: int | None
    processes: dict[str, ProcessHostTime]
    per_step: pa.Table = field(repr=False)   # step, process, part, ns

    def to_dict(self) -> dict:
        return {"rate_hz": self.rate_hz, "parts": list(PARTS),
                "processes": {p: v.to_dict() for p, v in self.processes.items()}}


def classify_frames(functions: list[str], files: list[str]) -> np.ndarray:
    """Per frame id: the index in PARTS its own rules give, or -1 (no rule)."""
    out = np.full(len(functions), -1, dtype=np.int8)
    for i, (function, file) in enumerate(zip(functions, files)):
        if "/vllm/v1/engine/core.py" in file and function.rsplit(".", 1)[-1] in _IO_FUNCTIONS:
            out[i] = PARTS.index("io_processing")
            continue
        for part, needle in _FILE_RULES:
            if needle in file:
                out[i] = PARTS.index(part)
                break
    return out


def classify_stack(stack, frame_part: np.ndarray, is_output: np.ndarray) -> int:
    """The part of one stack (frame ids, innermost first)."""
    for frame in stack:
        part = frame_part[frame] if 0 <= frame < frame_part.size else -1
        if part >= 0:
            if part == _SCHEDULER and any(is_output[f] for f in stack if 0 <= f < is_output.size):
                return _IO
            return int(part)
    return _OTHER


_SCHEDULER, _IO, _OTHER = PARTS.index("scheduler"), PARTS.index("io_processing"), PARTS.index("other")


def step_windows(steps: dict, forward: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per process: (step, start ns, end ns) of its step windows, sorted by start."""
    out = {"engine_core": (steps["step"], steps["t_schedule_start_ns"], steps["t_update_end_ns"])}
    for rank in np.unique(forward["rank"]) if forward["rank"].size else ():
        rows = (forward["rank"] == rank) & (forward["step"] >= 0)
        order = np.argsort(forward["t_start_ns"][rows], kind="stable")
        out[f"worker-{int(rank)}"] = tuple(forward[c][rows][order]
                                            for c in ("step", "t_start_ns", "t_end_ns"))
    return out


def host_time(samples: pa.Table, frames: pa.Table, steps: dict, forward: dict,
              rate_hz: int | None = None) -> HostTime | None:
    """Attribute each step window's sampled time; None when the trace has no host samples."""
    if samples.num_rows == 0:
        return None
    frame_ids = frames.column("frame").combine_chunks().to_numpy(zero_copy_only=False)
    size = int(frame_ids.max()) + 1 if frame_ids.size else 0
    frame_part = np.full(size, -1, dtype=np.int8)
    is_output = np.zeros(size, dtype=bool)
    functions, files = frames.column("function").to_pylist(), frames.column("file").to_pylist()
    frame_part[frame_ids] = classify_frames(functions, files)
    is_output[frame_ids] = [f.rsplit(".", 1)[-1] == _OUTPUT_FUNCTION and "/vllm/v1/core/sched/" in p
                            for f, p in zip(functions, files)]
    per_step: dict[str, list] = {"step": [], "process": [], "part": [], "ns": []}
    processes = {}
    cols = {c: samples.column(c).to_pylist() for c in ("t_ns", "duration_ns", "process", "thread", "stack")}
    for process, (step, start, end) in step_windows(steps, forward).items():
        mine = [i for i, (p, th) in enumerate(zip(cols["process"], cols["thread"]))
                if p == process and th == STEP_THREAD]
        if not mine:
            continue
        ns = np.zeros(len(PARTS), dtype=np.int64)
        for i in mine:
            t0 = cols["t_ns"][i]
            t1 = t0 + cols["duration_ns"][i]
            lo, hi = np.searchsorted(end, t0, side="right"), np.searchsorted(start, t1, side="left")
            if lo >= hi:
                continue
            part = classify_stack(cols["stack"][i], frame_part, is_output)
            for k in range(lo, hi):
                overlap = min(t1, int(end[k])) - max(t0, int(start[k]))
                if overlap > 0:
                    ns[part] += overlap
                    per_step["step"].append(int(step[k]))
                    per_step["process"].append(process)
                    per_step["part"].append(PARTS[part])
                    per_step["ns"].append(overlap)
        processes[process] = ProcessHostTime(
            process, "step" if process == "engine_core" else "forward",
            int((end - start).sum()), int(ns.sum()), {p: int(v) for p, v in zip(PARTS, ns)})
    table = _per_step_table(per_step)
    return HostTime(rate_hz, processes, table)


def _per_step_table(rows: dict) -> pa.Table:
    """Summed per (step, process, part)."""
    raw = pa.table({"step": pa.array(rows["step"], pa.int32()), "process": pa.array(rows["process"], pa.string()),
                    "part": pa.array(rows["part"], pa.string()), "ns": pa.array(rows["ns"], pa.int64())})
    summed = raw.group_by(["step", "process", "part"]).aggregate([("ns", "sum")])
    return pa.table({name: summed.column(name) for name in ("step", "process", "part")}
                    | {"ns": summed.column("ns_sum")}).sort_by([("step", "ascending")])
