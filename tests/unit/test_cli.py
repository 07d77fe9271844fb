"""The ``kvprof`` command on the golden trace: help, usage errors, ``info``, light imports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.ipc as ipc
import pytest

from kvprof.cli.main import main

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden-1.0" / "trace.arrow"
PARTS = Path(str(GOLDEN) + ".parts")
KVPROF = Path(sys.executable).parent / "kvprof"


def pyarrow_rows() -> dict[str, int]:
    """Row counts of every table, read with pyarrow alone."""
    def rows(path: Path) -> int:
        return ipc.open_stream(path).read_all().num_rows
    counts = {"steps": rows(GOLDEN)}
    for name in ("request_steps", "requests", "block_events", "preemptions", "prompts"):
        counts[name] = rows(PARTS / f"{name}.arrow")
    counts["forward"] = sum(rows(p) for p in PARTS.glob("forward-*.arrow"))
    return counts


def golden_run() -> dict:
    return json.loads(ipc.open_stream(GOLDEN).schema.metadata[b"kvprof.run"])


@pytest.mark.parametrize("command", [[str(KVPROF)], [sys.executable, "-m", "kvprof"]],
                         ids=["script", "module"])
def test_help_exits_0(command):
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: kvprof")
    assert "info" in proc.stdout and "run" in proc.stdout
    assert proc.stderr == ""


def test_unknown_subcommand_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "kvprof", "bogus"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("kvprof: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, head, tail", [
    (["bogus"], "argument COMMAND: invalid choice: ", "(see 'kvprof --help')"),
    (["info"], "the following arguments are required: path", "(see 'kvprof info --help')"),
    (["info", str(GOLDEN), "--bogus"], "unrecognized arguments: --bogus", "(see 'kvprof --help')"),
    (["run", "--prompts", "many"], "argument --prompts: invalid int value: 'many'",
     "(see 'kvprof run --help')"),
], ids=["unknown-subcommand", "missing-argument", "unknown-option", "bad-value"])
def test_usage_error_is_one_line_and_exit_2(argv, head, tail, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"kvprof: error: {head}") and err.endswith(f" {tail}\n")
    assert err.count("\n") == 1


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("usage: kvprof") and err == ""


def test_info_on_the_golden_trace(capsys):
    assert main(["info", str(GOLDEN)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = {line[:13].strip(): line[13:] for line in out.splitlines()}
    assert lines["trace"] == str(GOLDEN)
    assert lines["format"] == f"1.0 (kvprof {golden_run()['kvprof_version']}, vLLM 0.32.0)"
    assert golden_run()["vllm_version"] == "0.32.0"
    tables = dict(item.split("=") for item in lines["tables"].split(", "))
    assert {k: int(v) for k, v in tables.items()} == pyarrow_rows()
    assert lines["complete"] == "True"
    assert "warning" not in lines


def test_info_json(capsys):
    assert main(["info", str(GOLDEN), "--json"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert {"format_version", "vllm_version", "tables", "duration_s", "complete"} <= info.keys()
    assert info["format_version"] == "1.0"
    assert info["vllm_version"] == golden_run()["vllm_version"] == "0.32.0"
    assert info["tables"] == pyarrow_rows()
    steps = ipc.open_stream(GOLDEN).read_all()
    span_ns = steps.column("t_update_end_ns")[-1].as_py() - steps.column("t_schedule_start_ns")[0].as_py()
    assert info["duration_s"] == round(span_ns / 1e9, 6)
    assert info["complete"] is True
    assert info["rows_dropped"] == {} and info["warnings"] == []
    assert info["forward_rows_by_rank"] == {"0": pyarrow_rows()["forward"]}


def test_info_does_not_import_numba_or_vllm():
    code = ("import sys; from kvprof.cli.main import main; "
            f"assert main(['info', {str(GOLDEN)!r}]) == 0; "
            "heavy = sorted(m for m in ('numba', 'vllm', 'torch') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
