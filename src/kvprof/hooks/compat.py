"""Every vLLM name kvprof touches, in one table, checked before any hook is installed.

Like py-spy's version dispatch: one explicit list of supported releases, and a
clear "unsupported version" message naming the range, after which the engine
runs on untraced.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from kvprof.errors import UnsupportedVllmVersion

SUPPORTED_SERIES = ("0.32", "0.33")
SUPPORTED_RANGE = ">=0.32,<0.34"

# (module, attribute path, why kvprof needs it)
VLLM_NAMES: tuple[tuple[str, str, str], ...] = (
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "step inputs: batch composition"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", "step outputs, first tokens"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request", "queue time"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request", "preemption victims, recompute cost"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", "finished and aborted requests"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.free", "attribute freed blocks to a request"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.record_prefix_cache_stats", "prefix-hit tokens"),
    ("vllm.v1.core.block_pool", "BlockPool.get_new_blocks", "block allocation"),
    ("vllm.v1.core.block_pool", "BlockPool.free_blocks", "block frees"),
    ("vllm.v1.core.block_pool", "BlockPool.touch", "prefix-hit revivals"),
    ("vllm.v1.core.block_pool", "BlockPool._maybe_evict_cached_block", "evictions"),
    ("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", "blocks in use"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.__init__", "start tracing with KVPROF_TRACE"),
    ("vllm.v1.engine.core", "EngineCore.shutdown", "close the trace with the engine"),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.execute_model", "forward timing"),
)


# Instance attributes and fields read (not checkable on the classes; the integration
# tests on the real engine exercise every one of them):
VLLM_ATTRIBUTES: tuple[str, ...] = (
    "Scheduler.requests", "Scheduler.running", "Scheduler.waiting", "Scheduler.block_size",
    "Scheduler.kv_cache_config", "Scheduler.kv_cache_manager.block_pool", "Scheduler.vllm_config",
    "BlockPool.num_gpu_blocks", "BlockPool.cached_block_hash_to_block",
    "KVCacheBlock.block_id", "KVCacheBlock.ref_cnt", "KVCacheBlock.is_null",
    "Request.request_id", "Request.arrival_time", "Request.num_prompt_tokens",
    "Request.num_output_tokens", "Request.num_computed_tokens", "Request.num_preemptions",
    "Request.max_tokens", "Request.status", "Request.get_finished_reason", "Request.prompt_token_ids",
    "SchedulerOutput.scheduled_new_reqs (req_id, block_ids, num_computed_tokens)",
    "SchedulerOutput.scheduled_cached_reqs (req_ids, resumed_req_ids, new_block_ids, "
    "num_computed_tokens, num_output_tokens)",
    "SchedulerOutput.num_scheduled_tokens", "SchedulerOutput.total_num_scheduled_tokens",
    "EngineCore.scheduler", "EngineCore.model_executor", "Executor.collective_rpc",
    "EngineCoreClient.call_utility / call_utility_async", "LLM.llm_engine.engine_core",
    "WorkerWrapperBase.rpc_rank", "WorkerWrapperBase.worker.model_runner.model",
    "ModelRunner.model_memory_usage (CUDA runners)",
    "ParallelConfig.data_parallel_index / data_parallel_rank / data_parallel_size, "
    "process name EngineCore_DP<rank> (data-parallel replicas)",
    "LinearBase.input_size_per_partition / output_size_per_partition (weights the CPU backend repacked)",
)


@dataclass(frozen=True)
class CompatReport:
    vllm_version: str
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing


def series_of(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check(vllm_version: str | None = None) -> CompatReport:
    """Look up every name in the table; raise UnsupportedVllmVersion with the range."""
    if vllm_version is None:
        import vllm
        vllm_version = vllm.__version__
    if series_of(vllm_version) not in SUPPORTED_SERIES:
        raise UnsupportedVllmVersion(
            f"kvprof supports vLLM {SUPPORTED_RANGE}; this is vLLM {vllm_version}: "
            "the engine runs untraced")
    missing = []
    for module, path, _why in VLLM_NAMES:
        try:
            obj = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{path}")
    if missing:
        raise UnsupportedVllmVersion(
            f"vLLM {vllm_version} lacks {', '.join(missing)} that kvprof hooks "
            f"(supported: vLLM {SUPPORTED_RANGE}): the engine runs untraced")
    return CompatReport(vllm_version, ())


def resolve(module: str, cls: str):
    return getattr(importlib.import_module(module), cls)
