"""py-spy's host stacks: its chrometrace output back into runs, and step time by part of the engine.

The step windows come from a synthetic trace; the host_samples written beside it
have hand-set stacks and times, so each part's time is known exactly.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from kvprof.analysis import analyze
from kvprof.analysis.host import PARTS, host_time
from kvprof.format import schema as S
from kvprof.format.reader import read_trace
from kvprof.recorder.pyspy import FrameTable, stack_runs, write_table

from .synthetic import Spec, build

VLLM = "/venv/site-packages/vllm"
FRAMES = [  # frame id: (function, file)
    ("EngineCore.step", f"{VLLM}/v1/engine/core.py"),
    ("Scheduler.schedule", f"{VLLM}/v1/core/sched/scheduler.py"),
    ("BlockPool.get_new_blocks", f"{VLLM}/v1/core/block_pool.py"),
    ("Scheduler.update_from_output", f"{VLLM}/v1/core/sched/scheduler.py"),
    ("wrapper", "/src/kvprof/hooks/state.py"),
    ("EngineRecorder.after_schedule", "/src/kvprof/hooks/engine.py"),
    ("MultiprocExecutor.execute_model", f"{VLLM}/v1/executor/multiproc_executor.py"),
    ("dequeue", f"{VLLM}/distributed/device_communicators/shm_broadcast.py"),
    ("EngineCore.process_output_sockets", f"{VLLM}/v1/engine/core.py"),
    ("encode", "/venv/site-packages/msgspec/__init__.py"),
]
STACKS = {  # innermost first
    "scheduler": [1, 4, 0],                  # vLLM's schedule under kvprof's wrapper
    "kv_cache_manager": [2, 1, 4, 0],        # the block pool called by the scheduler
    "kvprof": [5, 4, 0],                     # kvprof's own hook body
    "io_processing": [3, 4, 0],              # update_from_output: outputs of the step
    "model_runner": [7, 6, 0],               # waiting for the worker's forward
    "other": [0],                            # the EngineCore's own loop
}


def test_chrometrace_events_back_into_runs_of_one_stack():
    """py-spy's B/E per stack change; --threads adds a 'thread (tid): name' frame at the bottom."""
    def ev(ph, name, ts, file="f.py", line=1, tid=7):
        return {"ph": ph, "name": name, "ts": ts, "pid": 42, "tid": tid,
                "args": {"filename": file, "line": line}}
    events = [ev("B", "thread (1234): MainThread", 100, file=""), ev("B", "main", 100), ev("B", "f", 100),
              ev("E", "f", 130), ev("B", "g", 130),
              ev("B", "thread (1235): Thread-1", 110, file="", tid=8), ev("B", "loop", 110, tid=8),
              ev("E", "g", 150), ev("E", "main", 150), ev("E", "thread (1234): MainThread", 150, file=""),
              ev("E", "loop", 150, tid=8), ev("E", "thread (1235): Thread-1", 150, file="", tid=8)]
    frames = FrameTable()
    rows = stack_runs(events, 1_000_000, "engine_core", frames)
    ids = {row[1]: row[0] for row in frames.rows}
    assert sorted(rows) == sorted([
        (1_100_000, 30_000, 42, "engine_core", 1234, "MainThread", [ids["f"], ids["main"]]),
        (1_130_000, 20_000, 42, "engine_core", 1234, "MainThread", [ids["g"], ids["main"]]),
        (1_110_000, 40_000, 42, "engine_core", 1235, "Thread-1", [ids["loop"]]),
    ])


def _write_host_tables(path: str, samples: list[tuple]) -> None:
    parts = path + S.PARTS_SUFFIX
    write_table(os.path.join(parts, S.PART_FILES["host_frames"]), "host_frames",
                [(i, fn, file, 10 + i) for i, (fn, file) in enumerate(FRAMES)])
    write_table(os.path.join(parts, S.PART_FILES["host_samples"]), "host_samples", samples)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A synthetic trace; in each of its steps the EngineCore's main thread spends known
    shares of the step in each part; runs outside steps or on other threads must not count."""
    path = str(tmp_path_factory.mktemp("host") / "trace.arrow")
    truth = build(path, [Spec(prompt=40, output=20), Spec(prompt=100, output=15, arrival_step=2)])
    starts, ends = truth.steps["t_schedule_start_ns"], truth.steps["t_update_end_ns"]
    samples, expected = [], dict.fromkeys(PARTS, 0)
    for k, (t0, t1) in enumerate(zip(starts.tolist(), ends.tolist())):
        cuts = np.linspace(t0, t1, len(STACKS) + 1).astype(np.int64).tolist()
        for (part, stack), a, b in zip(STACKS.items(), cuts, cuts[1:]):
            samples.append((a, b - a, 100, "engine_core", 100, "MainThread", stack))
            expected[part] += b - a
        # other threads are not the step's: never counted
        samples.append((t0, t1 - t0, 100, "engine_core", 101, "Thread-2", [9, 8]))
    # a run across the gap between steps 3 and 4 counts only inside them
    samples.append((int(ends[3]) - 1000, int(starts[4]) - int(ends[3]) + 3000, 100, "engine_core", 100,
                    "MainThread", STACKS["other"]))
    expected["other"] += 1000 + 2000
    _write_host_tables(path, samples)
    return path, expected, int((ends - starts).sum())


def test_step_time_by_part_equals_the_known_split(sampled):
    path, expected, window_ns = sampled
    result = analyze(read_trace(path)).host_time
    engine = result.processes["engine_core"]
    assert engine.ns == expected
    assert engine.window_ns == window_ns
    assert engine.sampled_ns == sum(expected.values())
    assert sum(engine.shares.values()) == pytest.approx(1.0)
    per_step = result.per_step.to_pydict()
    assert sum(per_step["ns"]) == sum(expected.values())
    assert set(per_step["part"]) == set(PARTS)


def test_json_report_carries_host_time(sampled):
    path, expected, _ = sampled
    report = analyze(read_trace(path)).to_dict()["host_time"]
    assert report["parts"] == list(PARTS)
    assert report["processes"]["engine_core"]["ns"] == expected


def test_a_trace_without_samples_has_no_host_time(tmp_path):
    path = str(tmp_path / "t.arrow")
    build(path, [Spec(prompt=10, output=3)])
    trace = read_trace(path)
    assert trace["host_samples"].num_rows == 0 and trace.warnings == []
    assert analyze(trace).host_time is None
    assert analyze(trace).to_dict()["host_time"] is None


def test_worker_forward_windows(tmp_path):
    """A worker's runs count inside its forward windows (synthetic: schedule end to update start)."""
    path = str(tmp_path / "t.arrow")
    truth = build(path, [Spec(prompt=10, output=5)])
    f0, f1 = truth.steps["t_schedule_end_ns"], truth.steps["t_update_start_ns"]
    samples = [(int(a), int(b - a), 200, "worker-0", 200, "MainThread", [6]) for a, b in zip(f0, f1)]
    samples.append((int(f1[0]), int(f0[1] - f1[0]), 200, "worker-0", 200, "MainThread", [5]))  # between
    _write_host_tables(path, samples)
    worker = analyze(read_trace(path)).host_time.processes["worker-0"]
    assert worker.window == "forward"
    assert worker.ns["model_runner"] == int((f1 - f0).sum()) == worker.sampled_ns
    assert worker.ns["kvprof"] == 0
