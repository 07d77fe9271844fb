"""What a trace never holds, tracing started twice on one LLM, and an unsupported vLLM.

Privacy: prompts with known text and known token ids go through a traced engine; every
file of the trace is searched (raw bytes, every decompressed Arrow buffer, every value)
for the text and for runs of the prompt and output token ids. Nothing is found by
default; with ``record_prompts=True`` the prompt ids are found (the prompts table).

Versions: an unsupported vLLM is simulated by a ``sitecustomize`` that pins the version
kvprof's compatibility check reads (``compat.check``), in every process of the engine.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

import kvprof
from kvprof.format import schema as S

from .checks import block_identity, token_identity
from .conftest import external_id

pytestmark = pytest.mark.engine

MARKER = "zqxKVPROFsecretMARKERqxz"
TEXT_PROMPTS = [f"{MARKER} def classified_{i}(payload): return payload * {i + 7}" for i in range(4)]
ID_RUN = [3001, 17, 2999, 404, 3777, 1234, 2048, 999]   # a run no trace column would hold
TOKEN_PROMPTS = [{"prompt_token_ids": ID_RUN * 12 + [100 + i, 200 + i]} for i in range(4)]
WINDOW = 6                  # consecutive ids searched for
MAX_TOKENS = 12
FAKE_VERSION = "0.31.0"
REFUSAL = (f"kvprof supports vLLM >=0.32,<0.34; this is vLLM {FAKE_VERSION}: "
           "the engine runs untraced")
ENGINE = dict(max_num_seqs=8, enforce_eager=True, with_tokenizer=True)


# ------------------------------------------------------- simulated vLLM version
SITECUSTOMIZE = '''
"""Test helper: kvprof's compatibility check sees the vLLM version in KVPROF_TEST_FAKE_VLLM."""
import functools
import os

if os.environ.get("KVPROF_TEST_FAKE_VLLM"):
    from kvprof.hooks import compat
    compat.check = functools.partial(compat.check, os.environ["KVPROF_TEST_FAKE_VLLM"])
'''

ENV_SCRIPT = '''
import json, sys
import kvprof
from kvprof.models.engine import make_llm
from kvprof.models.workload import make_workload

def main():
    llm = make_llm(**{engine})
    wl = make_workload(8, max_tokens=8, seed=5, length_scale=0.1)
    def run():
        llm.reset_prefix_cache()
        return [list(o.outputs[0].token_ids) for o in
                llm.generate(wl.prompts(), wl.sampling_params(), use_tqdm=False)]
    before = run()
    try:
        kvprof.trace(llm, sys.argv[1]).start()
        refusal = None
    except kvprof.UnsupportedVllmVersion as exc:
        refusal = [str(exc), exc.exit_code]
    after = run()
    llm.llm_engine.engine_core.shutdown()
    print("RESULT " + json.dumps({{"before": before, "after": after, "refusal": refusal}}))

if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def fake_version_runs(tmp_path_factory):
    """Two processes under a simulated vLLM 0.31, started before the module's engine so
    their start-ups overlap: KVPROF_TRACE plus kvprof.trace() in a script, and `kvprof run`."""
    folder = tmp_path_factory.mktemp("fake_version")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (folder / "script.py").write_text(ENV_SCRIPT.format(engine=ENGINE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "KVPROF_TEST_FAKE_VLLM": FAKE_VERSION}
    env.pop("KVPROF_TRACE", None)
    env.pop("_KVPROF_UNSUPPORTED_WARNED", None)
    paths = {"env": folder / "env.arrow", "api": folder / "api.arrow", "cli": folder / "cli.arrow"}
    procs = {
        "script": subprocess.Popen(
            [sys.executable, str(folder / "script.py"), str(paths["api"])],
            env={**env, "KVPROF_TRACE": str(paths["env"])}, cwd=folder, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "cli": subprocess.Popen(
            [sys.executable, "-m", "kvprof", "run", "--prompts", "2", "--max-tokens", "2",
             "--max-num-seqs", "2", "--trace", str(paths["cli"])],
            env=env, cwd=folder, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    }

    def collect():
        done = {}
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=400)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            done[name] = {"rc": proc.returncode, "stdout": out, "stderr": err}
        return done, paths

    yield functools.lru_cache(None)(collect)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def llm(fake_version_runs):
    from kvprof.models.engine import make_llm

    from .conftest import shutdown
    engine = make_llm(**ENGINE)
    yield engine
    shutdown(engine)


def _generate(llm, prompts, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams
    llm.reset_prefix_cache()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    return llm.generate(prompts, params, use_tqdm=False)


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def runs(llm, tmp_path_factory):
    """Untraced, then traced by default, then traced with record_prompts=True."""
    folder = tmp_path_factory.mktemp("privacy")
    prompts = TEXT_PROMPTS + TOKEN_PROMPTS
    untraced = _generate(llm, prompts)
    paths = {"default": folder / "default.arrow", "prompts": folder / "prompts.arrow"}
    with kvprof.trace(llm, paths["default"]):
        default = _generate(llm, prompts)
    default_digest = _digest(paths["default"])
    with kvprof.trace(llm, paths["prompts"], record_prompts=True):
        recorded = _generate(llm, prompts)
    return {"untraced": untraced, "default": default, "recorded": recorded, "paths": paths,
            "digests": (default_digest, _digest(paths["default"]))}


# ------------------------------------------------------------- the trace search
def _trace_files(path: Path) -> list[Path]:
    parts = Path(str(path) + S.PARTS_SUFFIX)
    return [path, *sorted(p for p in parts.rglob("*") if p.is_file())]


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in _trace_files(path)}


def _windows(ids: list[int]) -> list[tuple[int, ...]]:
    return [tuple(ids[i:i + WINDOW]) for i in range(len(ids) - WINDOW + 1)]


def _telling_windows(ids: list[int]) -> set:
    """Windows of two or more distinct ids: a run of one repeated id (the random model
    often repeats itself) would match any column's repeated values."""
    return {w for w in _windows(ids) if len(set(w)) >= 2}


def _byte_needles(window: tuple[int, ...]) -> list[bytes]:
    return [np.asarray(window, "<i4").tobytes(), np.asarray(window, "<i8").tobytes(),
            ", ".join(map(str, window)).encode(), ",".join(map(str, window)).encode()]


def _runs_found(values: list[int], windows: set) -> set:
    """The searched windows that occur as consecutive values."""
    return windows & set(_windows(values))


def find_in_trace(path: Path, text: str, id_seqs: list[list[int]]) -> list[str]:
    """Where ``text`` or a run of WINDOW ids of ``id_seqs`` occurs in any file of the trace:
    raw bytes, decompressed Arrow buffers (int32 / int64 little-endian), or values."""
    windows = set().union(*map(_telling_windows, id_seqs))
    needles = [text.encode()] + [n for w in windows for n in _byte_needles(w)]
    hits = []
    for f in _trace_files(path):
        raw = f.read_bytes()
        hits += [f"{f.name}: raw bytes" for n in needles if n in raw]
        if f.suffix == ".arrow" or f == path:
            hits += [f"{f.name}: {h}" for h in _find_in_arrow(f, text, needles, windows)]
    return hits


def _find_in_arrow(f: Path, text: str, needles: list[bytes], windows) -> list[str]:
    table = ipc.open_stream(pa.OSFile(str(f))).read_all()
    hits = []
    for name, column in zip(table.column_names, table.columns):
        for chunk in column.chunks:
            data = b"".join(b.to_pybytes() for b in chunk.buffers() if b is not None)
            hits += [f"{name} buffers" for n in needles if n in data]
        values = column.to_pylist()
        if pa.types.is_string(column.type):
            hits += [f"{name} value" for v in values if text in v]
        elif pa.types.is_list(column.type):
            hits += [f"{name} list value" for v in values if _runs_found(v, windows)]
        elif pa.types.is_integer(column.type) and _runs_found(values, windows):
            hits.append(f"{name} values")
    return hits


def _searched(runs, key: str):
    """The prompts' ids, and the outputs' ids that can be told from repeated values."""
    outputs = runs[key]
    prompt_ids = [list(o.prompt_token_ids) for o in outputs]
    output_ids = [t for t in _tokens(outputs) if _telling_windows(t)]
    return prompt_ids, output_ids


def test_the_search_itself_finds_what_is_there():
    table = pa.table({"x": pa.array([[5, *ID_RUN, 9]], pa.list_(pa.int32()))})
    assert _runs_found(table.column(0).to_pylist()[0], {tuple(ID_RUN[:WINDOW])})
    data = b"".join(b.to_pybytes() for b in table.column(0).chunks[0].buffers() if b)
    assert _byte_needles(tuple(ID_RUN[:WINDOW]))[0] in data


def test_no_prompt_text_or_token_ids_in_a_default_trace(runs):
    path = runs["paths"]["default"]
    assert kvprof.open_trace(path)["prompts"].num_rows == 0
    prompt_ids, output_ids = _searched(runs, "default")
    assert len(output_ids) >= 4 and all(_telling_windows(p) for p in prompt_ids)
    assert find_in_trace(path, MARKER, prompt_ids) == []
    assert find_in_trace(path, MARKER, output_ids) == []
    files = _trace_files(path)
    print(f"\nsearched {len(files)} files ({sum(f.stat().st_size for f in files)} bytes) for "
          f"{len(set().union(*map(_telling_windows, prompt_ids + output_ids)))} id runs "
          f"({len(output_ids)} of {len(runs['default'])} outputs telling)")
    for prompt in TEXT_PROMPTS:
        assert find_in_trace(path, prompt[len(MARKER):], []) == []


def test_record_prompts_stores_the_prompt_ids_and_nothing_else(runs):
    path = runs["paths"]["prompts"]
    trace = kvprof.open_trace(path)
    prompt_ids, output_ids = _searched(runs, "recorded")
    assert sorted(trace["prompts"].to_pandas().prompt_token_ids.map(list)) == sorted(prompt_ids)
    for ids in prompt_ids:
        hits = find_in_trace(path, MARKER, [ids])
        assert any("prompt_token_ids list value" in h for h in hits), hits
        assert any("prompt_token_ids buffers" in h for h in hits), hits
        assert {h.split(":")[0] for h in hits} == {"prompts.arrow"}
    print(f"\nrecord_prompts: found each prompt as {sorted(set(h.split(': ')[1] for h in hits))}")
    assert find_in_trace(path, MARKER, []) == []         # the text itself: never
    assert find_in_trace(path, MARKER, output_ids) == []  # output ids: never


def test_text_prompts_were_tokenized_into_long_id_runs(runs):
    text_ids = [list(o.prompt_token_ids) for o in runs["default"][:len(TEXT_PROMPTS)]]
    assert all(len(ids) > 2 * WINDOW for ids in text_ids)
    assert all(o.outputs[0].text is not None for o in runs["default"])


# ------------------------------------------------------ start / stop / start (LLM)
def test_two_traces_of_one_llm_are_separate(runs):
    from kvprof.analysis import analyze
    ids = []
    for key, outputs in (("default", runs["default"]), ("prompts", runs["recorded"])):
        trace = kvprof.open_trace(runs["paths"][key])
        assert trace.complete, trace.warnings
        req = trace["requests"].to_pandas()
        assert sorted(req.request_id.map(external_id)) == sorted(o.request_id for o in outputs)
        assert (req.output_tokens == MAX_TOKENS).all()
        steps = trace["steps"].to_pandas().step.to_numpy()
        assert np.array_equal(steps, np.arange(len(steps)))
        assert set(trace["request_steps"].to_pandas().req) == set(req.req)
        assert token_identity(trace) == {} and block_identity(trace) == []
        assert analyze(trace).to_dict()["requests"] == len(outputs)
        ids.append(set(req.request_id))
    assert not ids[0] & ids[1]
    assert runs["digests"][0] == runs["digests"][1]   # the second run left the first untouched


def test_outputs_identical_with_and_without_tracing(runs):
    assert _tokens(runs["default"]) == _tokens(runs["untraced"])
    assert _tokens(runs["recorded"]) == _tokens(runs["untraced"])
    assert all(len(t) == MAX_TOKENS for t in _tokens(runs["untraced"]))


# --------------------------------------------------------------- vLLM versions
def _kvprof_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kvprof")]


def test_trace_refuses_an_unsupported_vllm_and_the_engine_runs_on(llm, tmp_path, monkeypatch):
    """In this process: the check, run afresh, sees vLLM 0.31."""
    from kvprof.hooks import compat, plugin
    monkeypatch.setattr(compat, "check", functools.partial(compat.check, FAKE_VERSION))
    monkeypatch.setattr(plugin, "_installed", False)
    monkeypatch.setattr(plugin, "_unsupported", None)
    prompts = TOKEN_PROMPTS
    untraced = _generate(llm, prompts)
    path = tmp_path / "refused.arrow"
    with pytest.raises(kvprof.UnsupportedVllmVersion) as info:
        with kvprof.trace(llm, path):
            pass
    assert str(info.value) == REFUSAL and info.value.exit_code == 3
    assert not path.exists() and not Path(str(path) + S.PARTS_SUFFIX).exists()
    assert _tokens(_generate(llm, prompts)) == _tokens(untraced)


def test_kvprof_trace_variable_on_unsupported_vllm_warns_once_and_writes_nothing(
        llm, fake_version_runs):
    done, paths = fake_version_runs()
    script = done["script"]
    assert script["rc"] == 0, script["stderr"][-3000:]
    assert _kvprof_lines(script["stderr"]) == [f"kvprof: {REFUSAL}"]
    result = json.loads(next(line[7:] for line in script["stdout"].splitlines()
                             if line.startswith("RESULT ")))
    assert result["refusal"] == [REFUSAL, 3]        # kvprof.trace() there: the same message
    assert not paths["env"].exists() and not Path(str(paths["env"]) + S.PARTS_SUFFIX).exists()
    assert not paths["api"].exists()
    from kvprof.models.workload import make_workload
    wl = make_workload(8, max_tokens=8, seed=5, length_scale=0.1)
    reference = _tokens(_generate(llm, wl.prompts(), max_tokens=8))
    assert result["before"] == result["after"] == reference   # same as a supported engine's


def test_cli_run_on_unsupported_vllm_exits_3_with_one_line(fake_version_runs):
    done, paths = fake_version_runs()
    cli = done["cli"]
    assert cli["rc"] == 3, cli["stderr"][-3000:]
    assert _kvprof_lines(cli["stderr"]) == [f"kvprof: error: {REFUSAL}"]
    assert "Traceback" not in cli["stderr"]
    assert not paths["cli"].exists()
