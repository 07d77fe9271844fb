"""Which category a GPU kernel's time goes to: the one table of rules, by kernel name.

The CUPTI collector (``kvprof.recorder.cupti``) sums device time per step and kernel
name; these rules turn names into the ``forward`` table's category columns. The first
rule whose pattern matches (case-insensitive ``re.search``) wins, so order matters:
communication and attention come before GEMM, because NCCL and fused attention
kernels are often CUTLASS templates too. Memory copies and memsets are CUPTI records
of their own, named ``[memcpy ...]`` / ``[memset]`` by the collector.
"""
from __future__ import annotations

import re

# (category, pattern), first match wins. Column names: ``dev_<category>_ns``.
RULES: tuple[tuple[str, str], ...] = (
    ("memcpy", r"^\[mem(cpy|set)"),
    ("comm", r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|cross_device_reduce"
             r"|custom_?ar|one_?shot|two_?shot|nvshmem|deep_?ep"),
    ("attention", r"flash|fmha|attention|attn|paged|reshape_and_cache|concat_and_cache"
                  r"|sdpa|flashinfer|xformers|merge_attn|rotary"),
    ("gemm", r"gemm|gemv|matmul|cublas|cutlass|nvjet|xmma|wgmma|splitk|_mm_|mm_kernel"
             r"|marlin|machete|scaled_mm|dot_kernel"),
)
OTHER = "other"   # sampling, normalisation, activations, elementwise: everything else
CATEGORIES: tuple[str, ...] = ("gemm", "attention", "comm", "memcpy", OTHER)   # column order
COLUMNS: tuple[str, ...] = tuple(f"dev_{name}_ns" for name in CATEGORIES)

_COMPILED = tuple((CATEGORIES.index(name), re.compile(pattern, re.IGNORECASE)) for name, pattern in RULES)
_OTHER_INDEX = CATEGORIES.index(OTHER)


def classify(name: str) -> int:
    """Index into ``CATEGORIES`` of a kernel (or ``[memcpy ...]``) name."""
    for index, pattern in _COMPILED:
        if pattern.search(name):
            return index
    return _OTHER_INDEX


def category(name: str) -> str:
    return CATEGORIES[classify(name)]
