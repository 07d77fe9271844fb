"""kvprof's worker recorder around a real torch workload, without vLLM.

    python benchmarks/worker_harness.py [--device cuda|cpu] [--steps 120] [--out REPORT.json]

The hooks are the plugin's own: ``plugin._add_worker_methods`` installs
``kvprof_worker_start`` / ``_stop`` and the wrapped ``execute_model`` /
``sample_tokens`` on ``Wrapper``, a plain stand-in for vLLM's ``WorkerWrapperBase``
(which delegates to ``self.worker`` as vLLM's does). The worker runs a small
transformer-shaped forward whose batch and sequence lengths change every step,
launched asynchronously; sampling copies the token ids to the host, the workload's
one synchronisation, as vLLM's does. The stand-in scheduler output carries
``kvprof_step`` and ``total_num_scheduled_tokens`` as the EngineCore hook sets them.

What the run measures independently of kvprof, at the same points: CUDA events
around each forward (inside kvprof's), the torch allocator's counters and NVML right
after the wrapped call returns, nvidia-smi every ``SMI_EVERY`` steps, the wrapped
call's wall time minus the worker's own, and synchronisations (torch's sync debug
mode set to "error" everywhere but the workload's own copy, and counted calls of
the synchronize functions). ``run()`` returns all of it and ``summarize()`` the
figures; the verdicts are tests/gpu's, the record benchmarks/gpu_report.py's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

# (batch, sequence length) per step, cycled: every step a different shape.
CUDA_SHAPES = ((4, 512), (8, 256), (2, 2048), (16, 128), (8, 1024), (1, 4096), (32, 64), (4, 1536))
CPU_SHAPES = ((2, 16), (4, 8), (1, 48), (3, 24))
SMI_EVERY = 25
WARMUP = 5


class Model:
    """Embedding, ``layers`` pre-norm blocks (SDPA attention, GELU MLP), an LM head."""

    def __init__(self, torch, device: str, dim: int, heads: int, layers: int, vocab: int, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)

        def weight(*shape):
            return (torch.randn(*shape, generator=g) / shape[0] ** 0.5).to(device=device, dtype=dtype)

        self.torch, self.heads, self.vocab = torch, heads, vocab
        self.embed = weight(vocab, dim)
        self.blocks = [(weight(dim, 3 * dim), weight(dim, dim), weight(dim, 4 * dim), weight(4 * dim, dim))
                       for _ in range(layers)]
        self.head = weight(dim, vocab)

    def parameters(self):
        yield self.embed
        yield self.head
        for block in self.blocks:
            yield from block

    def forward(self, ids):
        F = self.torch.nn.functional
        x = self.embed[ids]
        b, s, d = x.shape
        for wqkv, wo, w1, w2 in self.blocks:
            h = F.layer_norm(x, (d,))
            q, k, v = (h @ wqkv).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(b, s, d) @ wo
            x = x + F.gelu(F.layer_norm(x, (d,)) @ w1) @ w2
        return x[:, -1]


class SchedulerOutput:
    """What the worker hook reads of vLLM's SchedulerOutput (the EngineCore hook sets kvprof_step)."""

    def __init__(self, step: int, batch: int, seq: int, ids=None):
        self.kvprof_step = step
        self.batch, self.seq = batch, seq
        self.total_num_scheduled_tokens = batch * seq
        self.ids = ids   # the step's input token ids, prepared on the host (pinned on CUDA)


def input_ids(torch, vocab: int, step: int, batch: int, seq: int, cuda: bool):
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(step))
    return ids.pin_memory() if cuda else ids


class ModelRunner:
    def __init__(self, model):
        self.model = model


class Worker:
    """The workload: ``execute_model`` launches the forward, ``sample_tokens`` copies ids out."""

    def __init__(self, torch, device: str, model: Model):
        self.torch, self.device, self.model_runner = torch, device, ModelRunner(model)
        self.cuda = device == "cuda"
        self.hidden = None
        self.inner: list[tuple] = []     # (step, start event, end event) or (step, wall ns)
        self.inner_wall_ns = 0

    def execute_model(self, so: SchedulerOutput):
        t = time.perf_counter_ns()
        torch = self.torch
        if self.cuda:   # the independent events: first and last thing of the worker's own call
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.hidden = self.model_runner.model.forward(so.ids.to("cuda", non_blocking=True))
            end.record()
            self.inner.append((so.kvprof_step, start, end))
        else:
            self.hidden = self.model_runner.model.forward(so.ids)
        self.inner_wall_ns = time.perf_counter_ns() - t
        return None

    def sample_tokens(self, *args, **kwargs):
        logits = (self.hidden @ self.model_runner.model.head).float()
        ids = self.torch.argmax(self.torch.softmax(logits, dim=-1), dim=-1)
        with allowed_sync(self.torch, self.cuda):
            return ids.cpu().tolist()   # the workload's own synchronisation, as vLLM's


@contextlib.contextmanager
def allowed_sync(torch, cuda: bool):
    if not cuda:
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def wrapper_class():
    """A fresh stand-in for WorkerWrapperBase with kvprof's real worker hooks installed."""
    from kvprof.hooks import plugin

    class Wrapper:
        rpc_rank = 0

        def __init__(self, worker):
            self.worker = worker

        def execute_model(self, scheduler_output, *args, **kwargs):
            return self.worker.execute_model(scheduler_output, *args, **kwargs)

    plugin._add_worker_methods(Wrapper)
    return Wrapper


class SyncCounter:
    """Counts calls of torch's synchronize functions while installed."""

    NAMES = (("cuda", "synchronize"), ("cuda.Event", "synchronize"), ("cuda.Stream", "synchronize"))

    def __init__(self, torch):
        self.torch, self.calls, self.saved = torch, 0, []

    def __enter__(self):
        for owner_name, attr in self.NAMES:
            owner = self.torch
            for part in owner_name.split("."):
                owner = getattr(owner, part)
            original = getattr(owner, attr)
            self.saved.append((owner, attr, original))

            def counted(*a, _original=original, **k):
                self.calls += 1
                return _original(*a, **k)
            setattr(owner, attr, counted)
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self.saved):
            setattr(owner, attr, original)


def nvidia_smi_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              f"--id={os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]}"],
                             capture_output=True, text=True, timeout=20)
        return int(out.stdout.strip().splitlines()[0])
    except Exception:
        return None


class Readings:
    """torch allocator and NVML (v1 and v2) read by the harness itself, by device index."""

    def __init__(self, torch):
        self.torch = torch
        self.nvml = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.nvml = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:
            pass

    def read(self) -> dict:
        cuda = self.torch.cuda
        row = {"allocated": cuda.memory_allocated(), "reserved": cuda.memory_reserved(),
               "peak": cuda.max_memory_allocated(), "nvml_used": None, "nvml_v2_used": None,
               "nvml_v2_reserved": None}
        if self.nvml is not None:
            row["nvml_used"] = int(self.pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used)
            try:
                v2 = self.pynvml.nvmlDeviceGetMemoryInfo(self.nvml, version=self.pynvml.nvmlMemory_v2)
                row["nvml_v2_used"], row["nvml_v2_reserved"] = int(v2.used), int(v2.reserved)
            except Exception:
                pass
        return row


def run(device: str = "cuda", steps: int = 120, collector: bool = True, profile: bool = False,
        workdir: str | None = None, dim: int | None = None) -> dict:
    """One traced run; returns kvprof's forward rows and the independent measurements."""
    import torch
    from kvprof.format import schema as S
    from kvprof.format.reader import read_stream
    from kvprof.recorder.session import parts_dir, prepare_target

    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    model = Model(torch, device, dim or (2048 if cuda else 64), 16 if cuda else 4, 4 if cuda else 2,
                  32768 if cuda else 512, torch.bfloat16 if cuda else torch.float32)
    worker = Worker(torch, device, model)
    wrapper = wrapper_class()(worker)
    workdir = workdir or tempfile.mkdtemp(prefix="kvprof-harness-")
    path = os.path.join(workdir, "trace.arrow")
    prepare_target(path, overwrite=True)
    readings = Readings(torch) if cuda else None
    if cuda:   # warm the workload (cuBLAS handles, allocator) before tracing, as a served model is
        for batch, seq in shapes:
            wrapper.execute_model(SchedulerOutput(0, batch, seq, input_ids(torch, model.vocab, 0, batch, seq, cuda)))
            wrapper.sample_tokens(None)
        worker.inner.clear()
        torch.cuda.synchronize()
    profiler = None
    if profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
        profiler.__enter__()
    wrapper.kvprof_worker_start(path, {"flush_interval_s": 0.05, "rss_every": 4, "collector": collector})
    measured = []
    counter = SyncCounter(torch) if cuda else contextlib.nullcontext()
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    t_run = time.perf_counter_ns()
    try:
        with counter:
            for step in range(steps):
                batch, seq = shapes[step % len(shapes)]
                so = SchedulerOutput(step, batch, seq, input_ids(torch, model.vocab, step, batch, seq, cuda))
                mono_start = time.monotonic_ns()
                with _range(torch, profile, f"harness_fwd_{step}"):
                    t0 = time.perf_counter_ns()
                    wrapper.execute_model(so)
                    outer_ns = time.perf_counter_ns() - t0
                    row = {"step": step, "tokens": batch * seq, "outer_ns": outer_ns,
                           "inner_ns": worker.inner_wall_ns, "mono_start": mono_start}
                    if readings is not None:
                        row.update(readings.read())
                        if step % SMI_EVERY == 0:
                            row["smi_used_mib"] = nvidia_smi_used_mib()
                    if profile:   # the reference run: each range holds its own kernels
                        with allowed_sync(torch, cuda):
                            torch.cuda.synchronize()
                with _range(torch, profile, f"harness_smp_{step}"):
                    wrapper.sample_tokens(None)
                row["mono_end"] = time.monotonic_ns()
                measured.append(row)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    run_ns = time.perf_counter_ns() - t_run
    syncs = counter.calls if cuda else 0
    end = wrapper.kvprof_worker_stop()
    profile_steps = None
    if profiler is not None:
        torch.cuda.synchronize()
        profiler.__exit__(None, None, None)
        profile_steps = profiler_kernels(profiler, steps)
    inner_device = {}
    if cuda:
        torch.cuda.synchronize()
        inner_device = {s: int(a.elapsed_time(b) * 1e6) for s, a, b in worker.inner}
    warnings: list[str] = []
    forward, meta = read_stream(os.path.join(parts_dir(path), S.forward_file(0)), "forward", warnings)
    run_meta = json.loads(meta[S.META_RUN])
    return {"device": device, "steps": steps, "rows": forward.to_pylist(), "measured": measured,
            "inner_device_ns": inner_device, "end": end, "read_warnings": warnings,
            "collector": run_meta["worker"].get("collector"), "syncs_counted": syncs,
            "run_ns": run_ns, "profile": profile_steps, "path": path}


def _range(torch, profile: bool, name: str):
    return torch.profiler.record_function(name) if profile else contextlib.nullcontext()


def profiler_kernels(profiler, steps: int) -> dict:
    """The torch profiler's kernel / memcpy / memset records per harness range, as
    {"fwd" | "smp": {step: [(name, ns), ...]}}. A record belongs to the range its GPU start
    falls in: the reference run synchronises at the end of each forward range, and a
    sampling range ends with its copy to the host, so no record crosses a range."""
    ranges, device = [], []
    for event in profiler.events():
        kind = event.device_type.name
        if kind == "CPU" and event.name.startswith(("harness_fwd_", "harness_smp_")):
            _, part, step = event.name.split("_")
            ranges.append((event.time_range.start, event.time_range.end, part, int(step)))
        elif kind == "CUDA" and not event.name.startswith("harness_"):   # not the ranges' GPU echo
            ns = int(round((event.time_range.end - event.time_range.start) * 1000))
            device.append((event.time_range.start, profiler_name(event.name), ns))
    ranges.sort()
    starts = np.array([r[0] for r in ranges])
    out: dict = {"fwd": {}, "smp": {}, "outside": 0}
    for start, name, ns in device:
        i = int(np.searchsorted(starts, start, side="right")) - 1
        if i < 0 or start > ranges[i][1]:
            out["outside"] += 1
            continue
        out[ranges[i][2]].setdefault(ranges[i][3], []).append((name, ns))
    return out


def profiler_name(name: str) -> str:
    """The torch profiler's memcpy / memset names, as the collector names them."""
    low = name.lower()
    if low.startswith("memcpy"):
        return "[memcpy]"
    if low.startswith("memset"):
        return "[memset]"
    return name


def summarize(result: dict) -> dict:
    """The figures the checks compare (pure: from ``run()``'s result)."""
    from kvprof.recorder import kernels
    rows = {r["step"]: r for r in result["rows"]}
    steps = [s for s in range(result["steps"]) if s >= WARMUP]
    device = [rows[s]["device_ns"] for s in steps if s in rows]
    summary = {
        "rows": len(result["rows"]), "steps": result["steps"],
        "device_null": sum(v is None for v in device),
        "hook_ns": _stats([r["hook_ns"] for r in result["rows"]]),
        "wrapper_overhead_ns": _stats([m["outer_ns"] - m["inner_ns"] for m in result["measured"]]),
        "syncs_counted": result["syncs_counted"], "collector": result["collector"],
        "end_complete": result["end"].get("complete"), "end_collector": result["end"].get("collector"),
    }
    inner = result["inner_device_ns"]
    if inner:
        rel = [abs(rows[s]["device_ns"] - inner[s]) / inner[s] for s in steps
               if s in rows and rows[s]["device_ns"] is not None and inner.get(s)]
        summary["device_vs_events_rel"] = _stats(rel, scale=1.0)
        summary["device_ns"] = _stats([v for v in device if v is not None])
    measured = {m["step"]: m for m in result["measured"]}
    if any("allocated" in m for m in measured.values()):
        summary["memory_mismatches"] = {
            col: sum(rows[s][col] != measured[s][key] for s in rows if s in measured)
            for col, key in (("torch_allocated_bytes", "allocated"), ("torch_reserved_bytes", "reserved"),
                             ("torch_peak_bytes", "peak"), ("gpu_used_bytes", "nvml_used"))}
        smi = [(rows[s]["gpu_used_bytes"], measured[s]) for s in rows
               if measured.get(s, {}).get("smi_used_mib") is not None]
        summary["smi_vs_nvml_mib"] = [
            {"kvprof_nvml_mib": used / 2**20, "smi_mib": m["smi_used_mib"],
             "nvml_v2_used_mib": (m["nvml_v2_used"] or 0) / 2**20} for used, m in smi]
    sums = [r for r in result["rows"] if r.get("dev_records") is not None]
    summary["collector_rows"] = len(sums)
    summary["collector_totals_ns"] = {c: sum(r[col] for r in sums)
                                      for c, col in zip(kernels.CATEGORIES, kernels.COLUMNS)}
    profile = result["profile"]
    if profile:
        totals = dict.fromkeys(kernels.CATEGORIES, 0)
        for part in ("fwd", "smp"):
            for found in profile[part].values():
                for name, ns in found:
                    totals[kernels.category(name)] += ns
        summary["profiler_totals_ns"] = totals
        summary["profiler_outside_records"] = profile["outside"]
        fwd = {s: sum(ns for _, ns in found) for s, found in profile["fwd"].items()}
        pairs = [(rows[s]["device_ns"], fwd.get(s, 0)) for s in steps if s in rows and rows[s]["device_ns"]]
        summary["profiler_kernels_vs_device_rel"] = _stats([abs(d - k) / d for d, k in pairs])
    return summary


def _stats(values, scale: float = 1.0) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float) * scale
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--no-collector", action="store_true")
    p.add_argument("--profile", action="store_true", help="under torch.profiler (the collector gives way)")
    p.add_argument("--out", help="write the summary as JSON here")
    args = p.parse_args()
    result = run(args.device, args.steps, collector=not args.no_collector, profile=args.profile)
    summary = summarize(result)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
