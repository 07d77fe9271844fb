"""Weight bytes, however the backend laid the weights out (hooks/worker.model_weight_bytes).

vLLM's CPU backend replaces a linear layer's ``weight`` by an empty parameter once it has
repacked it for oneDNN or SGL kernels (``dispatch_cpu_unquantized_gemm(remove_weight=True)``),
keeping the shard's shape in ``input_size_per_partition`` / ``output_size_per_partition``.
These modules are that layout, built by hand; the real engine's case is
tests/integration/test_weights.py.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvprof.hooks.worker import model_weight_bytes  # noqa: E402


class Linear(torch.nn.Module):
    """The attributes vLLM's LinearBase subclasses carry."""

    def __init__(self, n_in: int, n_out: int, dtype):
        super().__init__()
        self.input_size_per_partition, self.output_size_per_partition = n_in, n_out
        self.weight = torch.nn.Parameter(torch.zeros(n_out, n_in, dtype=dtype), requires_grad=False)

    def repack(self, dtype) -> None:
        """What vLLM does after handing the weight to a kernel's own buffer."""
        self.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)


class Model(torch.nn.Module):
    def __init__(self, dtype=torch.bfloat16, tied: bool = True):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16, dtype=dtype)
        self.qkv = Linear(16, 48, dtype)
        self.down = Linear(32, 16, dtype)
        self.norm = torch.nn.LayerNorm(16, dtype=dtype)
        self.head = torch.nn.Linear(16, 100, bias=False, dtype=dtype)
        if tied:
            self.head.weight = self.embed.weight


def expected(itemsize: int, tied: bool = True) -> int:
    params = 100 * 16 + 16 * 48 + 32 * 16 + 2 * 16 + (0 if tied else 100 * 16)
    return params * itemsize


@pytest.mark.parametrize("dtype,itemsize", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_weights_are_the_same_before_and_after_the_backend_repacks_them(dtype, itemsize):
    model = Model(dtype)
    assert model_weight_bytes(model) == (expected(itemsize), 0)
    model.qkv.repack(dtype)
    model.down.repack(dtype)
    assert sum(p.numel() for p in model.parameters()) * itemsize < expected(itemsize)
    assert model_weight_bytes(model) == (expected(itemsize), (16 * 48 + 32 * 16) * itemsize)


def test_tied_weights_count_once_and_untied_twice():
    assert model_weight_bytes(Model(tied=True))[0] == expected(2, tied=True)
    assert model_weight_bytes(Model(tied=False))[0] == expected(2, tied=False)


def test_an_empty_weight_without_a_known_shape_counts_as_empty():
    model = Model()
    model.norm.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16))
    assert model_weight_bytes(model) == (expected(2) - 16 * 2, 0)
