"""request_steps read from disk batch by batch gives the very report of the in-memory path.

``kvprof analyze`` leaves request_steps on disk (``read_trace(..., stream=...)``) and the
kernel's buffers grow as the rows demand: these tests hold the streamed path to the
in-memory one, byte for byte, and check each growth against an independent count.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvprof.analysis import NEEDED_TABLES, STREAMED_TABLES, analyze
from kvprof.analysis import request_pass
from kvprof.cli.main import main
from kvprof.format import schema as S
from kvprof.format.reader import read_trace
from kvprof.format.stream import TableStream, read_ahead
from kvprof.report.json_report import render

from .synthetic import Spec, build, mixed_specs


def streamed(path):
    return read_trace(str(path), NEEDED_TABLES, STREAMED_TABLES)


def in_memory(path):
    return read_trace(str(path), NEEDED_TABLES)


def message_ends(data: bytes) -> list[int]:
    """Byte offsets where each IPC message of a stream ends (header and body)."""
    ends, pos = [], 0
    while pos + 8 <= len(data) and data[pos:pos + 4] == b"\xff\xff\xff\xff":
        meta = int.from_bytes(data[pos + 4:pos + 8], "little")
        if meta == 0:
            break
        import pyarrow as pa
        message = pa.ipc.read_message(pa.py_buffer(data[pos:]))
        pos += 8 + meta + message.body.size
        ends.append(pos)
    return ends


@pytest.mark.parametrize("seed,window", [(0, None), (1, (0.1, 0.3)), (2, (None, 0.2))])
def test_streamed_report_is_the_in_memory_report(tmp_path, seed, window):
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(40, seed), batch_rows=13)
    trace = streamed(path)
    got = render(analyze(trace, window=window, predict=(8, 64)))
    assert "request_steps" not in trace.tables        # never loaded whole
    assert got == render(analyze(in_memory(path), window=window, predict=(8, 64)))


def test_cli_report_streams_and_matches(tmp_path, capsys):
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(30, 5), batch_rows=5)
    assert main(["analyze", str(path), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli == json.loads(render(analyze(in_memory(path))))


def test_other_gaps_buffer_grows_to_any_size(tmp_path, monkeypatch):
    """Inter-token gaps between non-adjacent steps (here: preemptions) fill a buffer that
    starts at one entry: every refill resumes at the row the kernel stopped at."""
    path = tmp_path / "t.arrow"
    specs = [Spec(prompt=40, output=30, arrival_step=i, preempt_at=(i + 5, i + 12, i + 20))
             for i in range(12)]
    truth = build(path, specs, batch_rows=9)
    non_adjacent = sum(int((np.diff([step for step, _ in r.emissions]) > 1).sum())
                       for r in truth.finished())
    assert non_adjacent >= 16            # several doublings of the buffer
    expected = render(analyze(in_memory(path)))
    monkeypatch.setattr(request_pass, "OTHER_GAPS_START", 1)
    result = analyze(streamed(path))
    assert render(result) == expected
    assert result.latency.to_dict()["itl"]["count"] == sum(len(r.emissions) - 1
                                                           for r in truth.finished())


def test_rows_of_requests_missing_from_the_requests_table(tmp_path):
    """A requests file cut short: rows name requests past its last row. The per-request
    state grows for them; they sample on decode rows (their prompt length is unknown)."""
    path = tmp_path / "t.arrow"
    truth = build(path, mixed_specs(30, 3), batch_rows=4)
    part = Path(str(path) + S.PARTS_SUFFIX) / "requests.arrow"
    data = part.read_bytes()
    ends = message_ends(data)
    part.write_bytes(data[:ends[2]])      # the schema and the first two batches (8 requests)
    trace = streamed(path)
    table_req = trace["requests"].column("req").to_pylist()
    assert max(table_req) < 10
    steps = {name: trace["steps"].column(name).to_numpy() for name in trace["steps"].column_names}
    requests = {name: np.asarray(trace["requests"].column(name).to_numpy(), np.int64)
                for name in ("req", "prompt_tokens", "output_tokens", "finish_ns")}
    chosen = requests["finish_ns"] >= 0
    result = request_pass.replay(trace, steps, requests, np.ones(steps["step"].size, bool), chosen)
    rows = truth.rows
    for r in range(max(table_req) + 1, int(rows["req"].max()) + 1):
        decode_rows = int(((rows["req"] == r) & (rows["phase"] == S.PHASE_DECODE)).sum())
        assert result.req_emitted[r] == decode_rows, r
    assert result.req_emitted.size > rows["req"].max()


def test_cut_request_steps_file_warns_once_like_the_in_memory_reader(tmp_path):
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(30, 4), batch_rows=6)
    part = Path(str(path) + S.PARTS_SUFFIX) / "request_steps.arrow"
    data = part.read_bytes()
    ends = message_ends(data)
    part.write_bytes(data[:ends[len(ends) // 2] + 5])
    memory_trace, stream_trace = in_memory(path), streamed(path)
    expected = analyze(memory_trace).to_dict()
    got = analyze(stream_trace).to_dict()
    assert got == expected
    assert any("cut after" in w for w in got["warnings"]) or \
        any("cut after" in w for w in stream_trace.warnings)
    assert stream_trace.warnings == memory_trace.warnings
    assert stream_trace.truncated == memory_trace.truncated


def test_a_second_pass_adds_no_second_warning(tmp_path):
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(10, 6), batch_rows=6)
    part = Path(str(path) + S.PARTS_SUFFIX) / "request_steps.arrow"
    data = part.read_bytes()
    part.write_bytes(data[:message_ends(data)[3] + 5])
    trace = streamed(path)
    for _ in range(2):
        for _batch in trace.batches("request_steps", ("step",)):
            pass
    assert sum("cut after" in w for w in trace.warnings) == 1


def test_table_stream_columns_and_rows(tmp_path):
    path = tmp_path / "t.arrow"
    truth = build(path, mixed_specs(12, 7), batch_rows=5)
    stream = TableStream(str(Path(str(path) + S.PARTS_SUFFIX) / "request_steps.arrow"),
                         "request_steps").checked()
    batches = list(read_ahead(stream.batches(("req", "tokens"))))
    assert all(b.schema.names == ["req", "tokens"] for b in batches)
    assert stream.rows_read == truth.rows["req"].size and stream.cut is None
    got = np.concatenate([b.column(1).to_numpy() for b in batches])
    assert np.array_equal(got, truth.rows["tokens"])


def test_read_ahead_passes_the_producers_error_on():
    def failing():
        yield 1
        raise ValueError("boom")

    seen = []
    with pytest.raises(ValueError, match="boom"):
        for item in read_ahead(failing()):
            seen.append(item)
    assert seen == [1]


def test_forward_files_of_two_ranks_stream_like_they_read(tmp_path):
    """Worker rank 1's file cut and its end record gone: the same report, warnings and
    truncation whether the forward files are read whole or streamed one after the other."""
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(20, 8), batch_rows=5, ranks=2,
          late=lambda step, rank: 40_000 * rank * (step % 3))
    parts = Path(str(path) + S.PARTS_SUFFIX)
    (parts / "end-worker-1.json").unlink()
    data = (parts / "forward-1.arrow").read_bytes()
    (parts / "forward-1.arrow").write_bytes(data[:message_ends(data)[4] + 7])
    memory_trace, stream_trace = in_memory(path), streamed(path)
    expected = render(analyze(memory_trace))
    assert render(analyze(stream_trace)) == expected
    assert "forward" not in stream_trace.tables
    assert sorted(stream_trace.warnings) == sorted(memory_trace.warnings)
    assert any("no end record from worker(s) [1]" in w for w in stream_trace.warnings)
    assert any("forward-1.arrow: cut after" in w for w in stream_trace.warnings)
    assert stream_trace.truncated and memory_trace.truncated


@pytest.mark.parametrize("batch_rows,window", [(3, None), (11, (0.05, 0.25))])
def test_ranks_merged_from_the_worker_files_are_the_in_memory_ranks(tmp_path, batch_rows, window):
    """Three ranks, each its own forward file read side by side (whole_steps), some
    batches cut mid-step: the same rank report as every row in memory at once."""
    path = tmp_path / "tp3.arrow"
    build(path, mixed_specs(30, 3), batch_rows=batch_rows, ranks=3,
          late=lambda step, rank: (step * 7 + rank * 3) % 11 * 1_000)
    trace = streamed(path)
    got = analyze(trace, window=window)
    want = analyze(in_memory(path), window=window)
    assert got.ranks is not None and got.ranks.ranks == [0, 1, 2]
    assert got.ranks.steps == got.steps
    assert json.dumps(got.ranks.to_dict()) == json.dumps(want.ranks.to_dict())


@pytest.mark.parametrize("window", [None, (0.1, 0.3)])
@pytest.mark.parametrize("read", [streamed, in_memory])
def test_timeline_reads_the_let_go_step_columns_again(tmp_path, window, read):
    """Running, waiting, blocks in use and RSS are summed before the request pass and let
    go; the timeline reads them from the trace again, at the selected steps only."""
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(40, 3), batch_rows=7)
    analysis = analyze(read(path), window=window)
    steps = in_memory(path)["steps"].to_pydict()
    start = np.asarray(steps["t_schedule_start_ns"])
    rel = (start - start[0]) / 1e9
    chosen = np.ones(rel.size, bool) if window is None else (rel >= window[0]) & (rel < window[1])
    timeline = analysis.timeline.to_pydict()
    assert list(timeline) == ["step", "t_s", "step_ms", "running", "waiting", "kv_blocks_used",
                              "decode_requests", "prefill_tokens", "total_tokens",
                              "context_tokens", "output_tokens", "rss_bytes"]
    for column, name in [("step", "step"), ("running", "num_running"), ("waiting", "num_waiting"),
                         ("kv_blocks_used", "kv_blocks_used"), ("rss_bytes", "rss_bytes"),
                         ("decode_requests", "num_decode_reqs"), ("total_tokens", "total_tokens")]:
        assert timeline[column] == np.asarray(steps[name])[chosen].tolist(), column
    assert sum(timeline["output_tokens"]) == analysis.tokens.output
    assert analysis.batch.max_running == max(timeline["running"])
    assert analysis.kv.peak_blocks_used == max(timeline["kv_blocks_used"])
    assert analysis.memory.readings["engine_rss_bytes"].max == max(timeline["rss_bytes"])


def test_per_request_latencies_are_made_when_asked_and_match_the_requests_table(tmp_path):
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(30, 4), batch_rows=5)
    analysis = analyze(streamed(path))
    assert "per_request_ms" not in analysis.latency.__dict__     # a JSON report never made it
    req = in_memory(path)["requests"].to_pandas().set_index("req")
    done = req[req.finish_ns >= 0]
    table = analysis.per_request.to_pandas().set_index("req")
    assert sorted(table.index) == sorted(done.index)
    ttft = ((done.first_token_ns - done.arrival_ns) / 1e6).where(done.first_token_ns >= 0)
    e2e = (done.finish_ns - done.arrival_ns) / 1e6
    assert np.allclose(table.loc[done.index, "ttft_ms"], ttft, equal_nan=True)
    assert np.allclose(table.loc[done.index, "e2e_ms"], e2e)
    assert analysis.latency.e2e.count == len(done)
    assert analysis.latency.e2e.p50 == pytest.approx(float(np.percentile(e2e, 50)))


def test_gapless_steps_replay_as_through_a_step_table(tmp_path, monkeypatch):
    """Steps numbered without a gap skip the step-number table: the kernel's two ways of
    placing a row's step give the same report."""
    path = tmp_path / "t.arrow"
    build(path, mixed_specs(40, 6), batch_rows=7)
    without_table = render(analyze(streamed(path), window=(0.05, None), predict=(8,)))
    plain = request_pass._step_lookup

    def with_table(step_numbers, where):
        lo, table = plain(step_numbers, where)
        assert table.size == 0                      # the synthetic trace has no gap
        return lo, np.arange(step_numbers.size, dtype=np.int32)   # step - lo -> position

    monkeypatch.setattr(request_pass, "_step_lookup", with_table)
    assert render(analyze(streamed(path), window=(0.05, None), predict=(8,))) == without_table
