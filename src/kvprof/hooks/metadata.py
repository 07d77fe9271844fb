"""Run metadata: what engine, model, KV geometry and machine a trace came from."""
from __future__ import annotations

import os
import platform
import socket
import time

import kvprof
from kvprof.format import schema
from kvprof.recorder.memory import rss_now


def _get(obj, *names, default=None):
    for name in names:
        obj = getattr(obj, name, None)
        if obj is None:
            return default
    return obj


def kv_geometry(scheduler) -> dict:
    """Bytes per block = sum over KV groups of page size per layer x layers in the group."""
    cfg = scheduler.kv_cache_config
    groups = []
    bytes_per_block = 0
    for group in cfg.kv_cache_groups:
        spec = group.kv_cache_spec
        layers = len(group.layer_names)
        page = int(spec.page_size_bytes)
        bytes_per_block += page * layers
        groups.append({"layers": layers, "page_size_bytes": page, "block_size": spec.block_size,
                       "num_kv_heads": _get(spec, "num_kv_heads"), "head_size": _get(spec, "head_size"),
                       "dtype": str(_get(spec, "dtype"))})
    return {
        "num_blocks": int(cfg.num_blocks),
        "usable_blocks": int(scheduler.kv_cache_manager.block_pool.num_gpu_blocks) - 1,
        "block_size": int(scheduler.block_size),
        "bytes_per_block": bytes_per_block,
        "kv_tensor_bytes": int(sum(t.size for t in cfg.kv_cache_tensors)),
        "groups": groups,
    }


def engine_config(vllm_config) -> dict:
    sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
    comp = vllm_config.compilation_config
    return {
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_model_len": vllm_config.model_config.max_model_len,
        "chunked_prefill": bool(_get(sched, "enable_chunked_prefill", default=False)),
        "async_scheduling": bool(_get(sched, "async_scheduling", default=False)),
        "gpu_memory_utilization": cache.gpu_memory_utilization,
        "prefix_caching": bool(cache.enable_prefix_caching),
        "kv_cache_memory_bytes": _get(cache, "kv_cache_memory_bytes"),
        "num_gpu_blocks_override": _get(cache, "num_gpu_blocks_override"),
        "cudagraph_capture_sizes": list(_get(comp, "cudagraph_capture_sizes", default=[]) or []),
        "enforce_eager": bool(vllm_config.model_config.enforce_eager),
        "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
    }


def model_shape(vllm_config) -> dict:
    mc = vllm_config.model_config
    hf = mc.hf_config
    return {
        "model": str(mc.model),
        "architecture": (getattr(hf, "architectures", None) or ["?"])[0],
        "layers": _get(hf, "num_hidden_layers"),
        "hidden_size": _get(hf, "hidden_size"),
        "num_attention_heads": _get(hf, "num_attention_heads"),
        "num_kv_heads": _get(hf, "num_key_value_heads"),
        "head_size": mc.get_head_size(),
        "vocab_size": _get(hf, "vocab_size"),
        "dtype": str(mc.dtype),
    }


def hardware() -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "memory_bytes": _host_memory()}


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def run_metadata(scheduler, options) -> dict:
    import vllm
    vc = scheduler.vllm_config
    return {
        "kvprof_version": kvprof.__version__,
        "format_version": schema.FORMAT_VERSION,
        "vllm_version": vllm.__version__,
        "started_unix_s": time.time(),
        "started_monotonic_ns": time.monotonic_ns(),
        "model": model_shape(vc),
        "kv": kv_geometry(scheduler),
        "engine": engine_config(vc),
        "hardware": hardware(),
        "options": options.to_dict(),
        "rss_at_start_bytes": rss_now(),   # the baseline of memory growth
    }
