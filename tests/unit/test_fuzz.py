"""A short, deterministic run of benchmarks/fuzz_reader.py's mutations under hypothesis.

Mutated copies of the golden trace (bit flips, cuts, splices, inserted or deleted
bytes, schema-metadata and column edits, end-record edits) go through read_trace,
analyze and the ``kvprof info`` / ``kvprof analyze --json`` entry points: only
KvprofError may escape, and a failing command prints one ``kvprof: error:`` line.
The long run (minutes, with cases/s) is ``python benchmarks/fuzz_reader.py``.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fuzz_reader", ROOT / "benchmarks" / "fuzz_reader.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

byte_op = st.tuples(st.sampled_from(sorted(fuzz.BYTE_MUTATIONS)), st.integers(0, 2**24),
                    st.integers(0, 2**16), st.binary(min_size=1, max_size=16))
structured_op = st.tuples(st.sampled_from(sorted(fuzz.STRUCTURED)), st.integers(0, 2**16),
                          st.integers(0, 2**16), st.binary(max_size=12))


@st.composite
def cases(draw):
    """(target file, ops): a file of the golden trace and what is done to it."""
    target = draw(st.sampled_from(sorted(fuzz.FILES)))
    first = []
    if target in fuzz.END_RECORDS:
        first = [("edit_end_record", draw(st.integers(0, 2**16)), draw(st.integers(0, 2**16)), b"")]
    elif draw(st.booleans()):
        first = [draw(structured_op)]
    return target, first + draw(st.lists(byte_op, min_size=0 if first else 1, max_size=3))


WORK = Path(tempfile.mkdtemp(prefix="kvprof-fuzz-"))


@settings(max_examples=200, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_mutated_traces_end_in_a_result_or_a_one_line_error(case):
    target, ops = case
    folder = WORK / "case"
    shutil.rmtree(folder, ignore_errors=True)
    path = fuzz.write_case(folder, target, fuzz.mutate(target, ops))
    outcome = fuzz.check(path)           # raises fuzz.Failure on a broken contract
    assert outcome == "analyzed" or outcome.startswith("refused:")


def test_the_seeded_loop_is_reproducible():
    """The benchmark's cases depend on (seed, case number) alone: a printed case replays."""
    assert [fuzz.describe_case(0, n) for n in range(50)] == [fuzz.describe_case(0, n) for n in range(50)]
    targets = {fuzz.describe_case(0, n)[0] for n in range(200)}
    assert targets == set(fuzz.FILES)       # every file of the trace gets mutated
    kinds = {op[0] for n in range(200) for op in fuzz.describe_case(0, n)[1]}
    assert kinds == set(fuzz.BYTE_MUTATIONS) | set(fuzz.STRUCTURED) | {"edit_end_record"}


def teardown_module():
    shutil.rmtree(WORK, ignore_errors=True)
