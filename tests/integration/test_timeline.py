"""A real engine traced with py-spy sampling: host stacks on the trace's clock, step time by
part of the engine, and the Perfetto export of that trace parsed back."""
from __future__ import annotations

import json

import pytest

import kvprof
from kvprof.analysis import analyze
from kvprof.analysis.host import PARTS
from kvprof.cli.main import main
from kvprof.report import perfetto

from unit import trace_events   # tests/ is on the path: the packages are unit, integration

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def sampled(engine, tmp_path_factory):
    from kvprof.models.workload import make_workload
    wl = make_workload(32, max_tokens=24, seed=5, length_scale=0.15)
    path = tmp_path_factory.mktemp("timeline") / "run.arrow"
    untraced = engine.generate(wl.prompts(), wl.sampling_params(), use_tqdm=False)
    with kvprof.trace(engine, path, py_spy=True) as handle:
        traced = engine.generate(wl.prompts(), wl.sampling_params(), use_tqdm=False)
    return {"path": str(path), "trace": kvprof.open_trace(path), "summary": handle.summary,
            "untraced": untraced, "traced": traced}


def test_sampling_leaves_outputs_unchanged(sampled):
    assert [o.outputs[0].token_ids for o in sampled["traced"]] == \
        [o.outputs[0].token_ids for o in sampled["untraced"]]


def test_samples_of_both_processes_lie_in_the_traced_span(sampled):
    trace, summary = sampled["trace"], sampled["summary"]
    assert summary["py_spy"]["failed"] == {} and summary["py_spy"]["rate_hz"] == 100
    samples = trace["host_samples"].to_pydict()
    assert set(samples["process"]) == {"engine_core", "worker-0"}
    assert set(summary["py_spy"]["processes"].values()) == set(samples["pid"])
    end = trace.end_records["engine_core"]
    starts = samples["t_ns"]
    stops = [t + d for t, d in zip(starts, samples["duration_ns"])]
    assert min(starts) >= end["started_ns"] and max(stops) <= end["stopped_ns"]
    assert all(d >= 0 for d in samples["duration_ns"])
    frames = trace["host_frames"].num_rows
    assert all(0 <= f < frames for stack in samples["stack"] for f in stack)
    assert "MainThread" in samples["thread"]


def test_step_time_by_part(sampled):
    host = analyze(sampled["trace"]).host_time
    assert set(host.processes) == {"engine_core", "worker-0"}
    for process in host.processes.values():
        assert sum(process.shares.values()) == pytest.approx(1.0)
        assert set(process.shares) == set(PARTS)
        assert 0 < process.sampled_ns <= 1.5 * process.window_ns
    # the worker's forward windows are its model runner's time
    assert host.processes["worker-0"].shares["model_runner"] > 0.5
    engine_ns = host.processes["engine_core"].ns
    assert engine_ns["model_runner"] > 0     # waiting for the worker's forward


def test_perfetto_export_of_the_real_trace_parses_back(sampled, tmp_path):
    out = tmp_path / "trace.json"
    assert main(["export", sampled["path"], "--perfetto", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    counts = trace_events.check(doc)
    trace = sampled["trace"]
    steps = trace["steps"].to_pylist()
    slices = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].startswith("step ")}
    assert len(slices) == len(steps)
    for row in steps:
        assert slices[f"step {row['step']}"]["args"] == {k: v for k, v in row.items() if not k.startswith("t_")}
    forwards = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].startswith("forward ")]
    assert len(forwards) == sum(1 for f in trace["forward"].to_pylist() if f["step"] >= 0)
    requests = {r["request_id"] for r in trace["requests"].to_pylist()}
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "b" and e["name"] in requests) == len(requests)
    samples = [e for e in doc["traceEvents"] if e.get("cat") == "py-spy"]
    assert len(samples) == trace["host_samples"].num_rows
    assert {e["pid"] for e in samples} == {perfetto.ENGINE_PID, perfetto.WORKER_PID0}
    assert counts["C"] >= 4 * len(steps)
