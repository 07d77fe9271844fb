"""``kvprof analyze``: the JSON interface, the text and HTML reports, --window, --predict,
and bad inputs (exit 2, one ``kvprof: error:`` line, never a traceback)."""
from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from kvprof.analysis import analyze
from kvprof.cli.main import main
from kvprof.format.reader import read_trace
from kvprof.report.json_report import clean

from .synthetic import Engine, Spec, build

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden-1.0" / "trace.arrow"
GOLDEN_PARTS = Path(str(GOLDEN) + ".parts")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "analyses.md"

LATENCY_KEYS = [f"latency_ms.{k}.{s}" for k in ("ttft", "tpot", "itl", "e2e", "queue")
                for s in ("mean", "p50", "p90", "p99")]
DOCUMENTED_KEYS = [
    "format_version", "requests", "steps", "duration_s", "tokens.input", "tokens.output",
    "throughput.output_tokens_per_s", "throughput.input_tokens_per_s", "throughput.requests_per_s",
    *LATENCY_KEYS, "kv.blocks_total", "kv.peak_blocks_used", "kv.bytes_per_block",
    "kv.prefix_hit_rate", "kv.preemptions", "kv.recomputed_tokens", "batch.mean_running",
    "batch.max_running", "step_time_model.coefficients", "step_time_model.r2",
]


def lookup(report: dict, dotted: str):
    value = report
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"{dotted}: no {part!r}"
        value = value[part]
    return value


def run_json(capsys, *argv) -> dict:
    assert main(["analyze", *map(str, argv), "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out)


def assert_refused(capsys, path, fragment: str = "", *extra) -> str:
    """Exit 2, nothing on stdout, one 'kvprof: error:' line on stderr."""
    assert main(["analyze", str(path), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kvprof: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and fragment in err, err
    return err


def own_copy(folder: Path) -> Path:
    path = folder / "trace.arrow"
    shutil.copyfile(GOLDEN, path)
    shutil.copytree(GOLDEN_PARTS, str(path) + ".parts")
    return path


def message_ends(data: bytes) -> list[int]:
    source = pa.BufferReader(data)
    return [source.tell() for _ in ipc.MessageReader.open_stream(source)]


# ------------------------------------------------------------------ the JSON interface
def test_json_has_every_documented_key_with_its_type(capsys):
    report = run_json(capsys, GOLDEN)
    for key in DOCUMENTED_KEYS:
        value = lookup(report, key)
        assert value is not None, key
    assert report["format_version"] == "1.0"
    assert isinstance(report["requests"], int) and isinstance(report["steps"], int)
    assert set(report["step_time_model"]["coefficients"]) == {
        "fixed_ns", "per_decode_request_ns", "per_prefill_token_ns", "per_context_token_ns"}
    assert 0 <= report["kv"]["prefix_hit_rate"] <= 1


def expand(pattern: str) -> list[str]:
    """`a.{b,c}.{d,e}` -> a.b.d, a.b.e, a.c.d, a.c.e"""
    pieces = re.split(r"\{([^}]*)\}", pattern)
    options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(pieces)]
    return ["".join(choice) for choice in itertools.product(*options)]


def test_every_documented_key_is_in_the_docs():
    text = re.sub(r"```.*?```", "", DOCS.read_text(), flags=re.S)
    quoted = re.findall(r"`([^`]+)`", text)
    named = {key for pattern in quoted for key in expand(pattern)}
    assert set(DOCUMENTED_KEYS) <= named, set(DOCUMENTED_KEYS) - named


def test_json_equals_the_analysis(capsys):
    report = run_json(capsys, GOLDEN)
    expected = clean(analyze(read_trace(str(GOLDEN))).to_dict())
    assert report == expected


def test_json_is_strict(capsys, tmp_path):
    """One request, one token: undefined latencies are null, not NaN."""
    path = tmp_path / "one.arrow"
    build(path, [Spec(prompt=3, output=1)])
    assert main(["analyze", str(path), "--json"]) == 0
    out, _ = capsys.readouterr()
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["latency_ms"]["tpot"]["mean"] is None


# ------------------------------------------------------------------ text, HTML, options
def test_text_report(capsys):
    assert main(["analyze", str(GOLDEN)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for title in ("Throughput", "Latency", "Batch composition", "KV cache", "Step-time model"):
        assert title in out


def test_html_report_is_self_contained(tmp_path, capsys):
    out_file = tmp_path / "report.html"
    assert main(["analyze", str(GOLDEN), "--html", str(out_file), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    page = out_file.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<img") >= 6
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)


def test_html_to_an_unwritable_place(tmp_path, capsys):
    assert_refused(capsys, GOLDEN, "cannot write", "--html", str(tmp_path / "no" / "such" / "r.html"))


def test_predict(capsys):
    report = run_json(capsys, GOLDEN, "--predict", "48,96")
    predictions = report["step_time_model"]["predictions"]
    assert [p["batch_size"] for p in predictions] == [48, 96]
    assert all(p["output_tokens_per_s"] > 0 for p in predictions)


@pytest.mark.parametrize("value", ["0", "a,b", "4,-2", ""])
def test_bad_predict_is_a_usage_error(value, capsys):
    assert_refused(capsys, GOLDEN, "--predict", "--predict", value)


def test_window(capsys):
    report = run_json(capsys, GOLDEN, "--window", "0.2:0.6")
    expected = clean(analyze(read_trace(str(GOLDEN)), window=(0.2, 0.6)).to_dict())
    assert report == expected
    whole = run_json(capsys, GOLDEN)
    assert 0 < report["steps"] < whole["steps"]
    assert report["window_s"] == [0.2, 0.6]
    open_end = run_json(capsys, GOLDEN, "--window", "0.2:")
    assert open_end["steps"] > report["steps"] and open_end["window_s"] == [0.2, None]


@pytest.mark.parametrize("value", ["5", "a:b", "0.6:0.2", "1:1"])
def test_bad_window_is_a_usage_error(value, capsys):
    assert_refused(capsys, GOLDEN, "--window", f"--window={value}")


def test_window_without_steps(capsys):
    assert_refused(capsys, GOLDEN, "selects no step", "--window", "100:200")


# ------------------------------------------------------------------ bad inputs
def test_not_an_arrow_file(tmp_path, capsys):
    path = tmp_path / "notes.arrow"
    path.write_text("hello, this is text\n")
    assert_refused(capsys, path, "not an Arrow IPC file")


def test_missing_file_and_folder(tmp_path, capsys):
    assert_refused(capsys, tmp_path / "nothing.arrow", "no such file")
    assert_refused(capsys, tmp_path, "is a folder")


def test_arrow_file_that_is_not_a_kvprof_trace(tmp_path, capsys):
    path = tmp_path / "plain.arrow"
    with ipc.new_stream(str(path), pa.schema([("x", pa.int32())])) as writer:
        writer.write_table(pa.table({"x": pa.array([1, 2, 3], pa.int32())}))
    assert_refused(capsys, path, "not a kvprof trace")


def test_newer_major_format_version(tmp_path, capsys):
    steps = ipc.open_stream(GOLDEN).read_all()
    meta = dict(steps.schema.metadata)
    meta[b"kvprof.format_version"] = b"2.0"
    path = own_copy(tmp_path)
    with ipc.new_stream(str(path), steps.schema.with_metadata(meta)) as writer:
        writer.write_table(steps)
    assert_refused(capsys, path, "newer than this reader")


def test_empty_trace(tmp_path, capsys):
    path = tmp_path / "empty.arrow"
    build(path, [])
    assert_refused(capsys, path, "no steps")


def test_trace_with_no_finished_request(tmp_path, capsys):
    path = tmp_path / "running.arrow"
    build(path, [Spec(prompt=10, output=100)], Engine(max_steps=6))
    assert_refused(capsys, path, "no request finished")


def test_main_file_cut_before_its_first_batch(tmp_path, capsys):
    path = own_copy(tmp_path)
    data = GOLDEN.read_bytes()
    path.write_bytes(data[:message_ends(data)[0] + 3])
    err = assert_refused(capsys, path, "no steps")
    assert "cut after 0 complete batches" in err


@pytest.mark.parametrize("table", ["steps", "request_steps"])
def test_truncated_trace_is_read_up_to_its_last_complete_batch(table, tmp_path, capsys):
    path = tmp_path / "t.arrow"
    build(path, [Spec(prompt=30, output=20, arrival_step=i) for i in range(6)], batch_rows=10)
    target = path if table == "steps" else Path(str(path) + ".parts") / "request_steps.arrow"
    data = target.read_bytes()
    ends = message_ends(data)
    target.write_bytes(data[:(ends[len(ends) // 2] + ends[len(ends) // 2 + 1]) // 2])
    assert main(["analyze", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert "kvprof: warning: " in err and "cut after" in err and "Traceback" not in err
    assert any("cut after" in w for w in report["warnings"])
    assert report["steps"] > 0


def test_bit_flips_never_end_in_a_traceback(tmp_path, capsys):
    """Each flipped byte: a clean refusal (exit 2, one line) or a report (exit 0)."""
    rng = random.Random(7)
    path = own_copy(tmp_path)
    targets = [GOLDEN, GOLDEN_PARTS / "request_steps.arrow", GOLDEN_PARTS / "requests.arrow"]
    copies = [path, Path(str(path) + ".parts") / "request_steps.arrow",
              Path(str(path) + ".parts") / "requests.arrow"]
    for original, copy in zip(targets, copies):
        data = original.read_bytes()
        for _ in range(12):
            damaged = bytearray(data)
            damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            copy.write_bytes(bytes(damaged))
            code = main(["analyze", str(path), "--json"])
            out, err = capsys.readouterr()
            assert code in (0, 2), err
            assert "Traceback" not in err
            if code == 2:
                assert err.startswith("kvprof: error: ") and err.count("\n") == 1 and out == ""
            else:
                assert all(line.startswith("kvprof: warning: ") for line in err.splitlines())
                json.loads(out)
        copy.write_bytes(data)


def test_a_bad_input_in_a_real_process_is_one_line(tmp_path):
    path = tmp_path / "notes.arrow"
    path.write_text("not arrow")
    proc = subprocess.run([sys.executable, "-m", "kvprof", "analyze", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("kvprof: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_analyze_in_a_real_process(tmp_path):
    out_file = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-m", "kvprof", "analyze", str(GOLDEN), "--json",
                           "--html", str(out_file), "--predict", "32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] > 0 and "<img" in out_file.read_text()
