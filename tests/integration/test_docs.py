"""Docs that run: every code block of the README and docs/*.md that is Python or a
kvprof shell command is executed, so that the docs cannot drift from the code.

How a page runs (``docs_blocks.py``):

- Each page runs in its own empty folder, with the repository's ``tests/`` and
  ``examples/`` linked in, so that paths such as ``tests/data/golden-1.0/trace.arrow``
  work as written. Its blocks run in page order in one Python process: a later block
  may use what an earlier one defined.
- ```` ```python ```` blocks run as written, as ``__main__``. Two stand-ins, for
  what the reader brings: ``LLM(model=..., ARGS)`` (or ``model="..."``) is the
  embedded tiny model with ARGS (``kvprof.models.engine.make_llm``), and ``prompts``
  and ``params`` are a small embedded workload, unless the page defines them.
- ```` ```bash ```` (``sh``, ``shell``, ``console``) blocks: each line that starts
  with ``kvprof`` runs in bash as written, with ``kvprof`` on the PATH. Other lines
  (``make``, a vLLM server, the reader's own script) are not kvprof's and do not run.
- ``trace.arrow`` is the reader's trace: a block that reads it before any block of the
  page wrote one gets a copy of one traced run of the embedded model, produced once
  per test session (``kvprof run``).
- ```` ```text ```` (``output``, ``math``) blocks show output, a file layout or a
  formula: not run. A block preceded by ``<!-- no-run: REASON -->`` is not run
  either; the reason says why (it needs a GPU, or runs for minutes). A block with no
  info string fails the test: every block says what it is.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from .docs_blocks import ROOT, blocks, pages, prepared

pytestmark = pytest.mark.engine

RUNNER = Path(__file__).resolve().parent / "docs_blocks.py"


def runnable(page: Path) -> bool:
    return any(b.kind == "python" or (b.kind == "shell" and b.kvprof_lines()) for b in blocks(page))


def test_every_block_says_what_it_is():
    all_blocks = [b for page in pages() for b in blocks(page)]
    unmarked = [b.where for b in all_blocks if b.kind == "unmarked"]
    assert not unmarked, f"blocks with no info string (python, bash or text?): {unmarked}"
    assert all(b.skip for b in all_blocks if b.kind == "no-run"), "a no-run marker needs a reason"
    counts = Counter(b.kind for b in all_blocks)
    assert counts["python"] >= 10 and counts["shell"] >= 5


def test_the_placeholder_model_becomes_the_embedded_one():
    assert prepared('llm = LLM(model="...", max_num_seqs=32)') == "llm = _docs_llm(max_num_seqs=32)"
    assert prepared("LLM(model=..., max_num_seqs=8)") == "_docs_llm(max_num_seqs=8)"


@pytest.fixture(scope="session")
def shim(tmp_path_factory) -> Path:
    """A folder holding a ``kvprof`` command that runs this checkout's kvprof."""
    folder = tmp_path_factory.mktemp("bin")
    script = folder / "kvprof"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m kvprof \"$@\"\n")
    script.chmod(0o755)
    return folder


def environment(shim: Path) -> dict:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": src if not path else f"{src}{os.pathsep}{path}",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}


@pytest.fixture(scope="session")
def shared_trace(tmp_path_factory, shim) -> str:
    """One traced run of the embedded model. Its length in seconds depends on the machine
    (0.2 s to 4 s seen): the pages' windows start at 0 so that they select steps on any."""
    path = tmp_path_factory.mktemp("shared") / "trace.arrow"
    proc = subprocess.run(["kvprof", "run", "--prompts", "64", "--max-tokens", "16",
                           "--trace", str(path)], capture_output=True, text=True,
                          env=environment(shim), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(path)


@pytest.mark.parametrize("page", [p for p in pages() if runnable(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page, tmp_path, shim, shared_trace):
    for name in ("tests", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    results_path = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(RUNNER), str(page), str(results_path), shared_trace],
                          cwd=tmp_path, capture_output=True, text=True, env=environment(shim),
                          timeout=1800)
    assert proc.returncode == 0 and results_path.exists(), proc.stderr[-3000:]
    results = json.loads(results_path.read_text())
    expected = [b for b in blocks(page) if b.kind in ("python", "shell")]
    assert [r["line"] for r in results] == [b.line for b in expected]
    failed = [f"{r['page']}:{r['line']} ({r['kind']}):\n{r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n\n".join(failed)
