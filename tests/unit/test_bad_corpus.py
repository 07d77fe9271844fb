"""The committed bad-input corpus (tests/data/bad/, built by scripts/make_bad_corpus.py).

For every file, ``kvprof info`` and ``kvprof analyze`` do what MANIFEST.json says:
exit 2 with exactly one ``kvprof: error:`` line naming the problem, or exit 0 on a
salvaged or merely empty trace with the reader's warning in the output; never a
traceback. A few run as a real ``kvprof`` subprocess, too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from kvprof.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "data" / "bad"
MANIFEST = json.loads((BAD / "MANIFEST.json").read_text())
CASES = MANIFEST["cases"]
KVPROF = Path(sys.executable).parent / "kvprof"


def generator():
    spec = importlib.util.spec_from_file_location("make_bad_corpus", ROOT / "scripts" / "make_bad_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_outcome(path: Path, expected: dict, rc: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err
    assert rc == expected["exit"], (rc, out, err)
    if rc != 0:
        assert out == ""
        assert err.count("\n") == 1 and err.endswith("\n"), err
        assert err.startswith(f"kvprof: error: {path.parent}/"), err
        assert expected["stderr"] in err, err
    for stream, text in (("stdout", out), ("stderr", err)):
        if rc == 0 and stream in expected:
            assert expected[stream] in text, text


@pytest.mark.parametrize("command", ["info", "analyze"])
@pytest.mark.parametrize("name", CASES)
def test_each_bad_file_is_answered_as_the_manifest_says(name, command, capsys):
    path = BAD / name
    rc = main([command, str(path)])
    out, err = capsys.readouterr()
    check_outcome(path, CASES[name][command], rc, out, err)


SUBPROCESS_CASES = [("info", "steps.parquet"), ("info", "truncated-in-schema.arrow"),
                    ("analyze", "future-major-2.0.arrow"), ("analyze", "part-wrong-type.arrow"),
                    ("analyze", "zero-steps.arrow")]


@pytest.mark.parametrize("command,name", SUBPROCESS_CASES)
def test_the_installed_command_answers_the_same(command, name):
    path = BAD / name
    proc = subprocess.run([str(KVPROF), command, str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "100"})
    check_outcome(path, CASES[name][command], proc.returncode, proc.stdout, proc.stderr)


def test_the_corpus_covers_what_issue_6_lists():
    whats = " | ".join(case["what"] for case in CASES.values())
    for kind in ("an empty file", "random bytes", "cut", "bit flipped", "Parquet", "CSV",
                 "Arrow IPC stream of another schema", "Arrow IPC file", "format 2.0",
                 "int64", "closed before its first step", "no request rows"):
        assert kind in whats, kind
    assert sum(case["parts"] != [] for case in CASES.values()) >= 8   # directory pairs


def test_the_corpus_is_small_and_every_listed_file_exists():
    files = [p for p in BAD.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    for name, case in CASES.items():
        assert (BAD / name).is_file()
        parts = BAD / f"{name}.parts"
        assert sorted(os.listdir(parts)) == case["parts"] if case["parts"] else not parts.exists()
    listed = set(CASES) | {f"{n}.parts" for n, case in CASES.items() if case["parts"]} | {"MANIFEST.json"}
    assert set(os.listdir(BAD)) == listed


def test_the_generator_rebuilds_the_committed_corpus(tmp_path):
    """Deterministic, and in step with what is committed (bytes: with the same pyarrow)."""
    module = generator()
    first, second = tmp_path / "a", tmp_path / "b"
    assert module.write(first) == module.write(second) == MANIFEST | {"pyarrow": pa.__version__}
    built = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert built == sorted(p.relative_to(BAD) for p in BAD.rglob("*") if p.is_file())
    for rel in built:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
        if MANIFEST["pyarrow"] == pa.__version__:
            assert (first / rel).read_bytes() == (BAD / rel).read_bytes(), rel
