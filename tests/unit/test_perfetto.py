"""``kvprof export --perfetto``: valid trace-event JSON whose slices and counters equal the trace."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvprof.cli.main import main
from kvprof.format import schema as S
from kvprof.format.reader import read_trace
from kvprof.report import perfetto

from . import trace_events
from .synthetic import Engine, Spec, build, mixed_specs
from .test_host_time import STACKS, _write_host_tables

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden-1.0" / "trace.arrow"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A synthetic trace with chunked prefills and preemptions, host samples in each step."""
    folder = tmp_path_factory.mktemp("perfetto")
    path = str(folder / "trace.arrow")
    truth = build(path, mixed_specs(30, seed=3), Engine(max_num_batched_tokens=256))
    steps = read_trace(path)["steps"].to_pylist()
    samples = [(s["t_schedule_start_ns"], s["t_update_end_ns"] - s["t_schedule_start_ns"], 100,
                "engine_core", 100, "MainThread", STACKS["scheduler"]) for s in steps]
    _write_host_tables(path, samples)
    out = str(folder / "trace.json")
    assert main(["export", path, "--perfetto", "-o", out]) == 0
    with open(out) as f:
        doc = json.load(f)
    return path, truth, read_trace(path), doc


def _origin(trace) -> int:
    arrivals = [t for t in trace["requests"].column("arrival_ns").to_pylist() if t >= 0]
    return min([trace["steps"].column("t_schedule_start_ns")[0].as_py(), *arrivals])


def test_the_export_is_valid_trace_event_json(exported):
    _, _, trace, doc = exported
    counts = trace_events.check(doc)
    steps = trace["steps"].num_rows
    assert counts["X"] >= 3 * steps + trace["forward"].num_rows
    assert counts["b"] == counts["e"] > 0


def test_step_slices_carry_the_step_rows(exported):
    _, _, trace, doc = exported
    origin = _origin(trace)
    slices = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].startswith("step ")}
    rows = trace["steps"].to_pylist()
    assert len(slices) == len(rows)
    for row in rows:
        ev = slices[f"step {row['step']}"]
        assert ev["args"] == {k: v for k, v in row.items() if not k.startswith("t_")}
        assert ev["ts"] == pytest.approx((row["t_schedule_start_ns"] - origin) / 1000)
        assert ev["dur"] == pytest.approx((row["t_update_end_ns"] - row["t_schedule_start_ns"]) / 1000)
        assert ev["pid"] == perfetto.ENGINE_PID and ev["tid"] == perfetto.STEPS_TID


def test_counters_equal_the_step_columns(exported):
    _, _, trace, doc = exported
    counters = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "C" and e["pid"] == perfetto.ENGINE_PID:
            counters.setdefault(e["name"], []).append(e["args"])
    rows = trace["steps"].to_pylist()
    assert counters["requests"] == [{"running": r["num_running"], "waiting": r["num_waiting"]} for r in rows]
    assert counters["KV blocks"] == [{"used": r["kv_blocks_used"], "cached": r["kv_blocks_cached"]} for r in rows]
    assert counters["scheduled tokens"] == [{"prefill": r["prefill_tokens"], "decode": r["decode_tokens"]}
                                            for r in rows]
    assert counters["EngineCore memory"] == [{"rss_bytes": r["rss_bytes"]} for r in rows]
    worker = [e["args"] for e in doc["traceEvents"] if e["ph"] == "C" and e["pid"] == perfetto.WORKER_PID0]
    assert worker == [{"rss_bytes": f["rss_bytes"]} for f in trace["forward"].to_pylist()]


def test_requests_show_queueing_prefill_chunks_preemptions_and_resumptions(exported):
    _, truth, trace, doc = exported
    asyncs = [e for e in doc["traceEvents"] if e["ph"] == "b"]
    names = {}
    for e in asyncs:
        names.setdefault(e["name"], 0)
        names[e["name"]] += 1
    requests = trace["requests"].to_pylist()
    assert sum(names.get(r["request_id"], 0) for r in requests) == len(requests)
    phases = trace["request_steps"].column("phase").to_pylist()
    assert names["prefill"] == phases.count(S.PHASE_PREFILL)
    assert names.get("prefill chunk", 0) == phases.count(S.PHASE_CHUNKED) > 0
    assert names["resumed"] == phases.count(S.PHASE_RESUMED) > 0
    assert names["preempted"] == trace["preemptions"].num_rows > 0
    assert names["decode"] == sum(1 for r in requests if r["first_token_ns"] >= 0)
    origin = _origin(trace)
    first = {e["id"]: e for e in asyncs if e["name"] in {r["request_id"] for r in requests}}
    for r in requests:
        assert first[str(r["req"])]["ts"] == pytest.approx((r["arrival_ns"] - origin) / 1000)
        assert first[str(r["req"])]["args"]["preemptions"] == r["preemptions"]


def test_host_samples_appear_on_their_process(exported):
    _, _, trace, doc = exported
    samples = [e for e in doc["traceEvents"] if e.get("cat") == "py-spy"]
    assert len(samples) == trace["host_samples"].num_rows
    assert {e["args"]["part"] for e in samples} == {"scheduler"}
    assert {e["name"] for e in samples} == {"Scheduler.schedule"}
    assert all(e["pid"] == perfetto.ENGINE_PID and e["tid"] >= perfetto.SAMPLE_TID0 for e in samples)


def test_every_nth_step_and_window(exported, tmp_path):
    path, _, trace, _ = exported
    evs = perfetto.events(trace, every=4)
    trace_events.check({"traceEvents": evs})
    steps = [int(e["name"].split()[1]) for e in evs if e["ph"] == "X" and e["name"].startswith("step ")]
    assert steps == [s for s in trace["steps"].column("step").to_pylist() if s % 4 == 0]
    t = trace["steps"].column("t_schedule_start_ns").to_pylist()
    lo, hi = (t[10] - t[0]) / 1e9, (t[20] - t[0]) / 1e9
    evs = perfetto.events(trace, window=(lo, hi))
    trace_events.check({"traceEvents": evs})
    steps = [int(e["name"].split()[1]) for e in evs if e["ph"] == "X" and e["name"].startswith("step ")]
    assert steps == list(range(10, 20))


def test_size_estimate_is_close_and_a_limit_refuses(exported, tmp_path, capsys):
    path, _, trace, _ = exported
    evs = perfetto.events(trace)
    out = tmp_path / "t.json"
    with open(out, "w") as f:
        written = perfetto.write(evs, f)
    assert perfetto.estimate_bytes(evs) == pytest.approx(written, rel=0.15)
    assert main(["export", path, "--perfetto", "-o", str(tmp_path / "big.json"), "--max-mb", "0.001"]) == 2
    assert "--window" in capsys.readouterr().err
    assert not (tmp_path / "big.json").exists()


def test_golden_trace_exports(tmp_path):
    out = tmp_path / "g.json"
    assert main(["export", str(GOLDEN), "--perfetto", "-o", str(out)]) == 0
    counts = trace_events.check(json.loads(out.read_text()))
    assert counts["X"] > 0 and counts["C"] > 0


def test_bad_input_and_missing_output_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.arrow"
    bad.write_text("not a trace")
    assert main(["export", str(bad), "--perfetto", "-o", str(tmp_path / "x.json")]) == 2
    assert main(["export", str(GOLDEN), "--perfetto"]) == 2
    assert main(["export", str(GOLDEN), "--perfetto", "-o", str(tmp_path / "x.json"), "--every", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "x.json")
