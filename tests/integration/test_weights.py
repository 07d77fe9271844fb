"""The worker's weights figure on the real engine equals the config's parameter count,
also where vLLM's CPU backend repacks linear weights out of ``model.parameters()``.

With float32 weights vLLM hands the decoder's linear layers to oneDNN on most x86 CPUs
(with bfloat16 it does so on CPUs with AVX-512 bf16): the engine here is one where the
repacking can happen on an ordinary CPU. The figure must not depend on whether it did.
"""
from __future__ import annotations

import pytest

import kvprof
from kvprof.format.reader import read_trace

from .checks import model_config, weights_bytes
from .conftest import shutdown

pytestmark = pytest.mark.engine


def linear_bytes(cfg: dict, dtype_bytes: int) -> int:
    """The decoder's q/k/v/o and gate/up/down weights: what the backend may repack."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return dtype_bytes * cfg["num_hidden_layers"] * (h * q + 2 * h * kv + q * h + 3 * h * inter)


def test_float32_weights_count_the_linear_layers_the_backend_repacked(tmp_path):
    from kvprof.models.engine import make_llm
    from kvprof.models.workload import make_workload
    llm = make_llm(max_num_seqs=4, dtype="float32", enforce_eager=True)
    try:
        workload = make_workload(4, max_tokens=4, seed=0, length_scale=0.05)
        with kvprof.trace(llm, tmp_path / "w.arrow"):
            llm.generate(workload.prompts(), workload.sampling_params(), use_tqdm=False)
    finally:
        shutdown(llm)
    worker = read_trace(tmp_path / "w.arrow").run["workers"][0]
    cfg = model_config()
    assert worker["weights_bytes"] == weights_bytes(cfg, dtype_bytes=4)
    # Either the backend repacked every decoder linear weight, or none (a CPU without oneDNN).
    assert worker["weights_repacked_bytes"] in (0, linear_bytes(cfg, 4))
