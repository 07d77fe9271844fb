"""The py-spy sampler on plain Python processes: its clock, and one warning where it cannot attach."""
from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from kvprof.api import _py_spy_wanted
from kvprof.format.reader import read_trace
from kvprof.recorder import pyspy
from kvprof.recorder.session import prepare_target

from .synthetic import Spec, build

pytestmark = pytest.mark.skipif(pyspy.binary() is None, reason="py-spy is not installed")

TARGET = """
import sys, time
def marker():
    print(time.monotonic_ns(), flush=True)    # the marker starts now
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        pass
    print(time.monotonic_ns(), flush=True)    # and ends now
print("ready", flush=True)
sys.stdin.readline()                          # wait until the sampler is launched
marker()
"""


def test_samples_are_on_the_monotonic_clock(tmp_path):
    """The runs whose innermost frame is the marker begin within its start and end, as the
    child read them on its own monotonic clock (allowing py-spy's 1-ms stamp offset). A
    run ends when py-spy next sees another stack, which a busy machine can delay by any
    amount: only its start is bounded."""
    path = str(tmp_path / "t.arrow")
    prepare_target(path, overwrite=True)
    child = subprocess.Popen([sys.executable, "-c", TARGET], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        sampler = pyspy.Sampler(path, {child.pid: "engine_core"}, rate=200)
        child.stdin.write("go\n")
        child.stdin.flush()
        start_ns, end_ns = int(child.stdout.readline()), int(child.stdout.readline())
        child.wait(timeout=120)
    finally:
        child.kill()
    sampler.stop()
    summary = sampler.write_tables()
    assert summary["failed"] == {} and summary["runs"] > 0
    samples = read_trace_tables(path)
    frames = dict(zip(samples["frames"]["frame"], samples["frames"]["function"]))
    marked = [(t, t + d) for t, d, stack in zip(samples["t_ns"], samples["duration_ns"], samples["stack"])
              if stack and frames[stack[0]] == "marker"]
    assert marked, "no sample inside the busy marker"
    slack = 5_000_000
    assert all(start_ns - slack <= t0 <= end_ns + slack and t1 > t0 for t0, t1 in marked), \
        (start_ns, end_ns, marked)


def read_trace_tables(path: str) -> dict:
    import pyarrow.ipc as ipc
    parts = path + ".parts/"
    samples = ipc.open_stream(parts + "host_samples.arrow").read_all().to_pydict()
    samples["frames"] = ipc.open_stream(parts + "host_frames.arrow").read_all().to_pydict()
    return samples


def test_a_process_it_cannot_attach_to_gives_one_warning(tmp_path, caplog):
    path = str(tmp_path / "t.arrow")
    build(path, [Spec(prompt=10, output=2)])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with caplog.at_level(logging.WARNING, logger="kvprof"):
        sampler = pyspy.Sampler(path, {gone.pid: "worker-0"})
        sampler.stop()
        summary = sampler.write_tables()
    warnings = [r.getMessage() for r in caplog.records if "py-spy" in r.getMessage()]
    assert len(warnings) == 1 and "worker-0" in warnings[0] and "tracing goes on" in warnings[0]
    assert summary["runs"] == 0 and "worker-0" in summary["failed"]
    trace = read_trace(path)
    assert trace["host_samples"].num_rows == 0 and trace.warnings == []


def test_py_spy_option_and_environment(monkeypatch):
    monkeypatch.delenv(pyspy.ENV_PY_SPY, raising=False)
    assert _py_spy_wanted(None) is False and _py_spy_wanted(True) is True
    monkeypatch.setenv(pyspy.ENV_PY_SPY, "1")
    assert _py_spy_wanted(None) is True and _py_spy_wanted(False) is False

