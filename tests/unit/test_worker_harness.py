"""The worker harness's CPU path: kvprof's real worker hooks (installed by the plugin's
own code on a stand-in for vLLM's WorkerWrapperBase) around a real torch forward whose
shape changes every step. On a CPU: wall-clock times only, device columns null, the
CUPTI collector inactive with its one reason. The CUDA path: tests/gpu."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kvprof.hooks.state import ProcessState
from kvprof.recorder import kernels

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("worker_harness", ROOT / "benchmarks" / "worker_harness.py")
harness = sys.modules.setdefault("worker_harness", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(harness)

STEPS = 14
DEVICE_COLUMNS = ("device_ns", "gpu_used_bytes", "torch_allocated_bytes", "torch_reserved_bytes",
                  "torch_peak_bytes", *kernels.COLUMNS, "dev_records")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    pytest.importorskip("torch")
    result = harness.run("cpu", STEPS, workdir=str(tmp_path_factory.mktemp("harness")))
    assert ProcessState.worker_recorder is None   # stopped by the plugin's kvprof_worker_stop
    return result


def test_every_step_has_one_row_with_its_number(cpu_run):
    assert [r["step"] for r in cpu_run["rows"]] == list(range(STEPS))
    assert {r["rank"] for r in cpu_run["rows"]} == {0}
    assert cpu_run["end"]["complete"] is True and cpu_run["end"]["rows_written"] == {"forward": STEPS}
    assert cpu_run["read_warnings"] == []


def test_wall_clock_times_lie_within_the_harness_own(cpu_run):
    """t_start after the harness called the wrapper, t_end (moved by sample_tokens) before
    sampling returned: the same monotonic clock as every kvprof process."""
    for row, m in zip(cpu_run["rows"], cpu_run["measured"]):
        assert m["mono_start"] <= row["t_start_ns"] < row["t_end_ns"] <= m["mono_end"], row["step"]


def test_device_columns_are_null_on_a_cpu(cpu_run):
    for column in DEVICE_COLUMNS:
        assert {r[column] for r in cpu_run["rows"]} == {None}, column


def test_the_collector_says_why_it_did_not_run(cpu_run):
    assert cpu_run["collector"] == {"active": False, "reason": "no CUDA device initialised in this worker"}
    assert "collector" not in cpu_run["end"]


def test_hook_cost_is_recorded_and_below_the_wrapped_call(cpu_run):
    for row, m in zip(cpu_run["rows"], cpu_run["measured"]):
        assert 0 < row["hook_ns"] < m["outer_ns"], row["step"]


def test_summary_of_a_cpu_run(cpu_run):
    summary = harness.summarize(cpu_run)
    assert summary["rows"] == STEPS and summary["syncs_counted"] == 0
    assert summary["device_null"] == STEPS - harness.WARMUP      # every step after warm-up: null on CPU
    assert summary["collector_rows"] == 0
    assert "device_vs_events_rel" not in summary and "memory_mismatches" not in summary
