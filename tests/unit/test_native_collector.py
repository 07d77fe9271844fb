"""The native CUPTI collector: built by CMakeLists.txt, loaded, and its clean fall-back
without a device; the per-step sums' path into the forward table; the category table.

On a CPU machine the module must import (libcupti is opened at run time, never
linked), the collector must stay off with one reason and no warning, and tracing
must be unaffected (tests/unit/test_worker_harness.py traces with it inactive). What
needs a GPU is in tests/gpu and scripts/gpu-check.sh.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvprof.analysis import analyze
from kvprof.format import schema as S
from kvprof.format.reader import read_trace
from kvprof.recorder import cupti, kernels

from . import synthetic

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "golden-1.0" / "trace.arrow"


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The module setup.sh built; built here with CMake if it is not there (as CI's first run)."""
    try:
        return importlib.import_module("kvprof._cupti")
    except ImportError:
        pass
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the native collector"
    build, out = tmp_path_factory.mktemp("build"), tmp_path_factory.mktemp("module")
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DKVPROF_OUTPUT_DIR={out}"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True)
    (path,) = out.glob("_cupti*.so")
    spec = importlib.util.spec_from_file_location("kvprof._cupti", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["kvprof._cupti"] = module
    return module


def test_the_module_imports_without_cuda_and_has_nothing_loaded(native):
    assert native.COMPILED_API_VERSION >= 18          # CUPTI of CUDA 12 or later
    assert native.loaded() is False
    assert native.take()[0] == [] and native.take()[2]["records"] == 0
    native.flush()                                     # nothing loaded: a no-op, not a crash


def test_loading_names_every_library_it_tried(native):
    with pytest.raises(RuntimeError) as info:
        native.load(["/nonexistent/libcupti.so.12", "libcupti.so.99"])
    message = str(info.value)
    assert message.startswith("no libcupti could be opened:")
    assert "/nonexistent/libcupti.so.12" in message and "libcupti.so.99" in message
    assert native.loaded() is False


def test_candidates_put_the_already_loaded_name_first_then_the_wheels(monkeypatch):
    names = cupti.library_candidates(12)
    assert names[0] == "libcupti.so.12"
    assert all(os.path.basename(p) == "libcupti.so.12" and os.path.isabs(p) for p in names[1:])
    wheel = [p for entry in sys.path
             for p in glob.glob(os.path.join(entry or ".", "nvidia", "cuda_cupti", "lib", "libcupti.so.12"))]
    if wheel:   # nvidia-cuda-cupti-cu12 (setup.sh installs it for the headers): its library is a candidate
        assert os.path.abspath(wheel[0]) in names


def test_without_cuda_the_collector_is_off_with_one_reason_and_no_warning(native, caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tests/gpu covers the collector there")
    with caplog.at_level(logging.WARNING, logger="kvprof"):
        collector, status = cupti.open_collector()
    assert collector is None
    assert status == {"active": False, "reason": "no CUDA device (torch.cuda is not available)"}
    assert caplog.records == []


def test_turned_off_by_option_or_environment(monkeypatch):
    assert cupti.open_collector(False) == (None, {
        "active": False, "reason": "turned off (collector=False or KVPROF_COLLECTOR=0)"})
    monkeypatch.setenv(cupti.ENV_COLLECTOR, "0")
    assert cupti.open_collector(True)[1]["reason"].startswith("turned off")


def test_a_missing_module_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvprof._cupti", None)    # import of it raises ImportError
    collector, status = cupti.open_collector()
    assert collector is None and status["active"] is False
    assert status["reason"].startswith("native collector not built") and "scripts/setup.sh" in status["reason"]


# ------------------------------------------------------------ categories
@pytest.mark.parametrize("name, expected", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "comm"),
    ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 2>", "comm"),
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>", "attention"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_tn_align8>", "gemm"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn", "gemm"),
    ("[memcpy HtoD]", "memcpy"), ("[memcpy DtoH]", "memcpy"), ("[memset]", "memcpy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "other"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),
])
def test_kernel_names_fall_in_their_category(name, expected):
    assert kernels.category(name) == expected


def test_category_columns_are_the_forward_table_columns():
    forward = [f.name for f in S.FORWARD]
    assert list(kernels.COLUMNS) + ["dev_records"] == forward[-len(kernels.COLUMNS) - 1:]
    assert set(S.ADDED_COLUMNS["forward"]) == set(kernels.COLUMNS) | {"dev_records"}
    assert all(f.nullable for f in S.FORWARD if f.name in S.ADDED_COLUMNS["forward"])


# ------------------------------------------------------------ the sums into the rows
class ScriptedNative:
    """The native module's interface with records scripted per take (the C++ side's sums)."""

    def __init__(self, takes):
        self.takes = list(takes)
        self.calls = []

    def start(self, **kwargs):
        self.calls.append("start")

    def push(self, external_id):
        self.calls.append(("push", external_id))

    def pop(self):
        self.calls.append("pop")

    def flush(self, forced=False):
        self.calls.append(("flush", forced))

    def take(self, patience=2):
        rows, names = self.takes.pop(0) if self.takes else ([], [])
        return rows, names, {"records": sum(r[3] for r in rows), "dropped": 0}

    def stop(self):
        self.calls.append("stop")


class ReadyEvent:
    """A CUDA event stand-in that has always completed, 2 ms after its partner."""

    def __init__(self, enable_timing=True):
        pass

    def record(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 2.0


def test_sums_reach_their_steps_rows_and_late_records_are_counted(tmp_path, monkeypatch):
    """Steps 0-2 traced. The flush after step 1 takes step 0's records and one of step 1's;
    the close takes step 2's and two records of steps already written (late). External ids
    are step + 1; names are interned once, in the order first seen."""
    torch = pytest.importorskip("torch")
    from kvprof.hooks import worker as worker_module
    from kvprof.hooks.state import ProcessState
    from kvprof.recorder.session import prepare_target
    harness = _harness()
    scripted = ScriptedNative([
        ([(1, 0, 1000, 2), (1, 1, 500, 1), (2, 0, 300, 1)], ["nvjet_x", "flash_fwd_kernel"]),
        ([(3, 2, 40, 1), (3, 0, 7, 1), (1, 0, 9, 1), (2, 1, 5, 1)], ["[memcpy HtoD]"]),
    ])
    monkeypatch.setattr(worker_module, "_cuda_events", lambda: ReadyEvent)
    monkeypatch.setattr(worker_module, "open_collector", lambda enabled: (
        cupti.Collector(scripted, "scripted"), {"active": True, "library": "scripted"}))
    path = str(tmp_path / "trace.arrow")
    prepare_target(path, overwrite=True)
    model = harness.Model(torch, "cpu", 16, 2, 1, 64, torch.float32)
    wrapper = harness.wrapper_class()(harness.Worker(torch, "cpu", model))
    wrapper.kvprof_worker_start(path, {"flush_interval_s": 3600})
    for step in range(3):
        wrapper.execute_model(harness.SchedulerOutput(step, 1, 4, harness.input_ids(torch, 64, step, 1, 4, False)))
        wrapper.sample_tokens(None)
        if step == 1:
            ProcessState.worker_recorder.flush()     # steps 0 and 1 are written here
    end = wrapper.kvprof_worker_stop()
    forward = {r["step"]: r for r in _forward_rows(path)}
    assert [c for c in scripted.calls if c[0] == "push"] == [("push", 1)] * 2 + [("push", 2)] * 2 + [("push", 3)] * 2
    assert scripted.calls.count("pop") == 6                      # the forward and the sampling call
    assert {r["device_ns"] for r in forward.values()} == {2_000_000}
    expect = {0: (1000, 500, 0, 0, 0, 3), 1: (300, 0, 0, 0, 0, 1), 2: (7, 0, 0, 40, 0, 2)}
    for step, values in expect.items():
        assert tuple(forward[step][c] for c in (*kernels.COLUMNS, "dev_records")) == values, step
    assert end["collector"]["late_records"] == 2
    assert end["collector"]["active"] is True and scripted.calls[-2:] == [("flush", True), "stop"]


def _harness():
    if "worker_harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("worker_harness", ROOT / "benchmarks" / "worker_harness.py")
        module = sys.modules.setdefault("worker_harness", importlib.util.module_from_spec(spec))
        spec.loader.exec_module(module)
    return sys.modules["worker_harness"]


def _forward_rows(path: str) -> list[dict]:
    from kvprof.format.reader import read_stream
    from kvprof.recorder.session import parts_dir
    table, _ = read_stream(os.path.join(parts_dir(path), S.forward_file(0)), "forward", [])
    return table.to_pylist()


# ------------------------------------------------------------ reading and analysing
def test_a_format_1_0_trace_reads_with_null_device_columns():
    trace = read_trace(str(GOLDEN))
    assert trace.format_version == "1.0"
    forward = trace["forward"]
    assert forward.num_rows > 0
    for column in S.ADDED_COLUMNS["forward"]:
        assert forward.column(column).null_count == forward.num_rows, column
    assert analyze(trace).device_time.steps == 0


def test_analyze_sums_categories_over_the_run_and_per_step(tmp_path):
    """A synthetic trace whose forward rows carry known sums: totals, shares and per-step
    statistics are the ones computed here from the same formula."""
    def sums(step):
        return (1000 + 10 * step, 400, 0, 50 + step, 100, 7)
    path = str(tmp_path / "trace.arrow")
    synthetic.build(path, [synthetic.Spec(prompt=40, output=6, arrival_step=i) for i in range(4)],
                    device=sums)
    trace = read_trace(path)
    steps = trace["forward"].column("step").to_pylist()
    d = analyze(trace).device_time
    expected = np.array([sums(s) for s in steps], dtype=float)
    assert d.steps == len(steps) and d.records == 7 * len(steps)
    for i, name in enumerate(kernels.CATEGORIES):
        assert d.total_ns[name] == int(expected[:, i].sum()), name
        assert d.per_step_ns[name].p90 == pytest.approx(np.percentile(expected[:, i], 90))
    assert d.share["gemm"] == pytest.approx(expected[:, 0].sum() / expected[:, :5].sum())
    assert d.kernel_share_of_device_time is None          # device_ns is null in the synthetic trace
    from kvprof.cli.info import collector_status, render_collector
    assert render_collector(collector_status(trace)) == "not recorded (a trace written before format 1.1)"
