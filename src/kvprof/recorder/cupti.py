"""The CUPTI collector's Python side: where it may run, which libcupti, per-step sums.

The native module ``kvprof._cupti`` (built by CMakeLists.txt) opens libcupti with
dlopen, so it imports anywhere; this module decides whether to use it. It runs only
where torch has CUDA, opens the libcupti of torch's CUDA major (12 or 13: the one
torch already loaded, else a pip wheel's, else the toolkit's), and gives way, with
one warning, to another CUPTI client: the torch profiler, whether it was there first
or starts later (CUPTI has one activity client per process).
"""
from __future__ import annotations

import glob
import importlib
import os
import sys

from kvprof.recorder import kernels

NO_SUMS = (None,) * (len(kernels.CATEGORIES) + 1)   # category columns + dev_records: not measured
ENV_COLLECTOR = "KVPROF_COLLECTOR"   # "0": never load it
_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        from kvprof.hooks.state import log
        log.warning("kvprof: %s", message)


def native_module():
    """The compiled module, or the reason it is not there."""
    try:
        return importlib.import_module("kvprof._cupti"), None
    except ImportError as exc:
        return None, f"native collector not built ({exc}); run scripts/setup.sh"


def cuda_major() -> int | None:
    """The CUDA major version torch was built for, where torch can use a GPU now."""
    try:
        import torch
        if not torch.cuda.is_available() or not torch.version.cuda:
            return None
        return int(str(torch.version.cuda).split(".")[0])
    except Exception:
        return None


def library_candidates(major: int) -> list[str]:
    """libcupti.so.<major> paths, most likely first; the bare name last (the loader's search)."""
    name = f"libcupti.so.{major}"
    paths = []
    for entry in sys.path:
        for sub in ("cuda_cupti", f"cu{major}"):
            paths += glob.glob(os.path.join(entry or ".", "nvidia", sub, "lib", name))
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob(f"/usr/local/cuda-{major}*"), reverse=True)]
    for home in filter(None, homes):
        paths += [os.path.join(home, "extras", "CUPTI", "lib64", name), os.path.join(home, "lib64", name)]
    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths if os.path.exists(p)))
    return [name] + unique   # the bare name first: in the no-load pass it finds torch's own


def _profiler_check():
    """torch's own flag of a running profiler (about 0.2 µs a call), or a constant False."""
    try:
        import torch
        check = torch._C._autograd._profiler_enabled
        check()
        return check
    except Exception:
        return lambda: False


def profiler_active() -> bool:
    return bool(_profiler_check()())


class Collector:
    """One process's CUPTI activity collection; ``push``/``pop`` bracket a step's launches."""

    def __init__(self, native, library: str):
        self.native = native
        self.library = library
        self.push = native.push
        self.pop = native.pop
        self.names: list[int] = []      # name id -> category index
        self.stats: dict = {}
        self.late_records = 0           # records of steps whose rows were already written
        self.gave_way: str | None = None
        self._profiling = _profiler_check()
        native.start(buffer_bytes=1 << 20, flush_period_ms=0)

    def still_alone(self) -> bool:
        """False, once, when the torch profiler has started since: stop using CUPTI at all."""
        if self.gave_way is None and self._profiling():
            self.gave_way = "the torch profiler started; the CUPTI collector gave way to it"
            _warn_once(self.gave_way)
        return self.gave_way is None

    def take(self, final: bool = False) -> dict[int, list[int]]:
        """step -> [ns per category..., records] for the records delivered so far."""
        if self.gave_way is not None:
            return {}
        self.native.flush(forced=final)
        rows, new_names, self.stats = self.native.take(patience=0 if final else 2)
        self.names += [kernels.classify(name) for name in new_names]
        width = len(kernels.CATEGORIES)
        steps: dict[int, list[int]] = {}
        for external_id, name_id, ns, count in rows:
            sums = steps.get(external_id - 1)
            if sums is None:
                sums = steps[external_id - 1] = [0] * (width + 1)
            sums[self.names[name_id]] += ns
            sums[width] += count
        return steps

    def close(self) -> dict:
        if self.gave_way is None:
            self.native.stop()
        return self.summary()

    def summary(self) -> dict:
        return {"active": self.gave_way is None, "library": self.library, "gave_way": self.gave_way,
                "late_records": self.late_records, **{k: int(v) for k, v in self.stats.items()}}


def open_collector(enabled: bool = True) -> tuple[Collector | None, dict]:
    """(collector, status); status says why there is none (one line, for ``kvprof info``)."""
    if not enabled or os.environ.get(ENV_COLLECTOR) == "0":
        return None, {"active": False, "reason": "turned off (collector=False or KVPROF_COLLECTOR=0)"}
    native, missing = native_module()
    if native is None:
        return None, {"active": False, "reason": missing}
    major = cuda_major()
    if major is None:
        return None, {"active": False, "reason": "no CUDA device (torch.cuda is not available)"}
    if profiler_active():
        reason = "the torch profiler is active; the CUPTI collector gives way to it"
        _warn_once(reason)
        return None, {"active": False, "reason": reason}
    try:
        library = native.load(library_candidates(major))
        if native.other_subscriber():
            reason = "another CUPTI client is subscribed; the CUPTI collector gives way to it"
            _warn_once(reason)
            return None, {"active": False, "reason": reason}
        collector = Collector(native, library)
    except RuntimeError as exc:
        return None, {"active": False, "reason": f"CUPTI unusable: {exc}".replace("\n", " ")}
    return collector, {"active": True, "library": library, "cuda_major": major,
                       "cupti_version": int(native.runtime_version()),
                       "compiled_cupti_version": int(native.COMPILED_API_VERSION)}
