"""Two writers never share a trace: a second engine told to write where another is writing
is refused at start, the first trace stays whole, and the path is free once it is done."""
from __future__ import annotations

import pytest

import kvprof
from kvprof.format.reader import read_trace

from .checks import block_identity, token_identity

pytestmark = pytest.mark.engine


def test_a_second_engine_cannot_write_a_trace_being_written(engine, small_kv_engine, tmp_path):
    from kvprof.models.workload import make_workload
    workload = make_workload(4, max_tokens=8, seed=3, length_scale=0.1)
    path = tmp_path / "shared.arrow"
    with kvprof.trace(engine, path) as first:
        writer = first.started["pid"]
        with pytest.raises(kvprof.TraceTargetError, match=f"process {writer} is writing it"):
            kvprof.trace(small_kv_engine, path, overwrite=True).start()
        engine.generate(workload.prompts(), workload.sampling_params(), use_tqdm=False)
    trace = read_trace(path)
    assert trace.complete and trace.warnings == []
    assert trace["requests"].num_rows == 4
    assert token_identity(trace) == {} and block_identity(trace) == []

    with kvprof.trace(small_kv_engine, path, overwrite=True):   # free once the first stopped
        small_kv_engine.generate(workload.prompts()[:2], workload.sampling_params(), use_tqdm=False)
    again = read_trace(path)
    assert again.complete and again["requests"].num_rows == 2
