"""The embedded default engine: a real ``vllm.LLM`` on a tiny random-weight Llama.

Nothing is downloaded: the config (and a small byte-level tokenizer) ship with
kvprof, and ``load_format="dummy"`` gives random weights. On a CPU the KV pool
is a fixed byte budget so the engine starts on a 2-core, 24 GiB machine.
"""
from __future__ import annotations

from importlib import resources

DEFAULT_KV_BYTES = 512 * 1024 * 1024


def tiny_model_path() -> str:
    """Folder holding the tiny Llama config and tokenizer."""
    return str(resources.files("kvprof.models") / "tiny_llama")


def engine_kwargs(*, max_num_seqs: int = 64, num_kv_blocks: int | None = None,
                  kv_cache_bytes: int = DEFAULT_KV_BYTES, with_tokenizer: bool = False,
                  enable_prefix_caching: bool = True, max_num_batched_tokens: int | None = None,
                  seed: int = 0, **overrides) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` on the embedded model.

    ``num_kv_blocks`` caps the KV pool (tests use it to provoke preemption).
    """
    kwargs = dict(
        model=tiny_model_path(),
        load_format="dummy",
        skip_tokenizer_init=not with_tokenizer,
        max_num_seqs=max_num_seqs,
        max_model_len=4096,
        enable_prefix_caching=enable_prefix_caching,
        seed=seed,
        dtype="bfloat16",
        disable_log_stats=False,
    )
    if max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    if num_kv_blocks is not None:
        kwargs["num_gpu_blocks_override"] = num_kv_blocks
        # vLLM refuses a pool that cannot hold one request of max_model_len.
        block_size = 16 if _has_cuda() else 128
        kwargs["max_model_len"] = min(4096, (num_kv_blocks - 1) * block_size)
    if not _has_cuda():
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    kwargs.update(overrides)
    return kwargs


def make_llm(**kwargs):
    """A real ``vllm.LLM`` on the embedded model (see ``engine_kwargs``)."""
    from vllm import LLM
    return LLM(**engine_kwargs(**kwargs))


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False
