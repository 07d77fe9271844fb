"""The code blocks of the README and docs/*.md, and how the docs test runs one page.

Also a script: ``python docs_blocks.py PAGE.md RESULTS.json`` runs the page's blocks in
order in the current folder and writes one result per block. Blocks run in one process
so that a later block may use what an earlier one defined (``llm`` of the quickstart);
they run under ``if __name__ == "__main__"`` because vLLM's spawned processes re-import
the main module.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ("python", "py", "python3")
SHELL = ("bash", "sh", "shell", "console")
NOT_CODE = ("text", "output", "math")
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(.*?)\s*-->\s*$")
# "LLM(model=..., " / 'LLM(model="...", ' stand for the reader's own model.
_PLACEHOLDER_LLM = re.compile(r"\bLLM\(model=(?:\.\.\.|\"\.\.\.\"),\s*")


@dataclass
class Block:
    page: str          # relative to the repository root
    line: int          # of the opening fence, 1-based
    info: str          # the info string
    code: str
    skip: str | None   # the reason of a <!-- no-run: ... --> marker

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        """'python', 'shell', 'text', 'no-run' or 'unmarked' (an error: say what it is)."""
        if self.skip is not None:
            return "no-run"
        if self.info in PYTHON:
            return "python"
        if self.info in SHELL:
            return "shell"
        return "text" if self.info in NOT_CODE else "unmarked"

    def kvprof_lines(self) -> list[str]:
        """The shell block's lines that run kvprof (other commands are the reader's own:
        make, a vLLM server, a script of theirs)."""
        return [line for line in self.code.splitlines() if line.strip().startswith("kvprof ")]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a page, with the no-run marker on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        indent = len(fence.group(1))
        code = "\n".join(line[indent:] for line in lines[i + 1:end])
        marker = _NO_RUN.match(lines[i - 1]) if i else None
        out.append(Block(str(page.relative_to(ROOT)), i + 1, fence.group(2), code,
                         marker.group(1) if marker else None))
        i = end + 1
    return out


def prepared(code: str) -> str:
    """A Python block as the test runs it: the reader's model becomes the embedded one."""
    return _PLACEHOLDER_LLM.sub("_docs_llm(", code)


def _docs_llm(**kwargs):
    """The embedded tiny model for a block written for the reader's own model."""
    from kvprof.models.engine import make_llm
    return make_llm(enforce_eager=True, **kwargs)


def provide_names(code: str, namespace: dict) -> None:
    """Names a block may use without defining them: the reader's ``prompts`` and
    ``params`` (a small embedded workload), made only for a block that names them (they
    import vLLM), and the engine stand-in."""
    namespace.setdefault("__name__", "__main__")
    namespace.setdefault("_docs_llm", _docs_llm)
    if re.search(r"\b(prompts|params)\b", code) and "prompts" not in namespace:
        from kvprof.models.workload import make_workload
        workload = make_workload(8, max_tokens=8, length_scale=0.15)
        namespace.update(prompts=workload.prompts(), params=workload.sampling_params())


def run_shell(block: Block, shared_trace: str | None) -> None:
    """Each kvprof line, as written, in bash; the reader's trace.arrow is the shared one
    unless an earlier block of the page wrote its own."""
    for line in block.kvprof_lines():
        _provide_trace(shared_trace)
        proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"`{line}` exited {proc.returncode}: {proc.stderr[-1500:]}")


def _provide_trace(shared_trace: str | None) -> None:
    import shutil
    if shared_trace and not Path("trace.arrow").exists():
        shutil.copy(shared_trace, "trace.arrow")
        shutil.copytree(shared_trace + ".parts", "trace.arrow.parts")


def run_page(page: Path, shared_trace: str | None) -> list[dict]:
    namespace: dict = {}
    results = []
    for block in blocks(page):
        if block.kind not in ("python", "shell"):
            continue
        result = {**asdict(block), "kind": block.kind, "ok": True, "error": None}
        try:
            if block.kind == "python":
                if "kvprof.trace(" not in block.code:     # a block that reads the reader's trace
                    _provide_trace(shared_trace)
                provide_names(block.code, namespace)
                exec(compile(prepared(block.code), block.where, "exec"), namespace)
            else:
                run_shell(block, shared_trace)
        except BaseException:   # noqa: BLE001 - the test reports every failure with its block
            result.update(ok=False, error=traceback.format_exc()[-3000:])
        results.append(result)
    llm = namespace.get("llm")
    if llm is not None and hasattr(llm, "llm_engine"):
        llm.llm_engine.engine_core.shutdown()
    return results


if __name__ == "__main__":
    page_path, results_path = Path(sys.argv[1]), sys.argv[2]
    shared = sys.argv[3] if len(sys.argv) > 3 else None
    with open(results_path, "w") as f:
        json.dump(run_page(page_path, shared), f)
    sys.stdout.flush()
    import os
    os._exit(0)   # engines left by a page's blocks end with the process
