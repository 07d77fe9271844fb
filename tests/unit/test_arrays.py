"""The analyzer's array helpers against their whole-array NumPy definitions."""
from __future__ import annotations

import numpy as np
import pytest

from kvprof.analysis.arrays import GrowingColumns, masked_diff
from kvprof.analysis.step_model import step_samples


@pytest.mark.parametrize("n", [1, 2, 7, 64, 65, 130, 1000])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_masked_diff_is_the_diff_at_the_mask_then_the_tail(n, chunk):
    rng = np.random.default_rng(n * 100 + chunk)
    values = np.cumsum(rng.integers(0, 1 << 40, n))
    keep = rng.random(n - 1) < 0.6
    tail = rng.integers(0, 50, 5)
    got = masked_diff(values, keep, tail, chunk=chunk)
    assert got.dtype == np.int64
    assert np.array_equal(got, np.concatenate([np.diff(values)[keep], tail]))
    assert np.array_equal(masked_diff(values, keep, chunk=chunk), np.diff(values)[keep])


def test_step_samples_cycles_across_chunks():
    """Cycles of busy steps other than the last, past the helper's default chunk."""
    rng = np.random.default_rng(3)
    n = (1 << 20) + 5
    start = np.cumsum(rng.integers(1, 10_000, n))
    busy = rng.random(n) < 0.7
    busy[-1] = True
    samples = step_samples(start, busy, np.arange(n), np.arange(n), np.arange(n), 4)
    keep = busy.copy()
    keep[-1] = False
    assert np.array_equal(samples.cycle_ns, np.diff(start)[keep[:-1]])
    assert np.array_equal(samples.decode, np.arange(n)[keep])


@pytest.mark.parametrize("capacity", [1, 3, 1 << 16])
def test_growing_columns_equal_the_joined_pieces(capacity):
    rng = np.random.default_rng(capacity)
    pieces = [{"a": rng.integers(0, 1 << 40, n), "b": rng.integers(0, 100, n).astype(np.int32)}
              for n in (0, 1, 5, 2, 17, 0, 40)]
    grown = GrowingColumns(capacity)
    for piece in pieces:
        grown.append(piece)
    out = grown.finished(("a", "b", "never"))
    assert out["a"].dtype == np.int64 and out["b"].dtype == np.int32
    for name in ("a", "b"):
        assert np.array_equal(out[name], np.concatenate([p[name] for p in pieces]))
    assert out["never"].size == 0


def test_growing_columns_widen_to_a_later_batchs_dtype():
    """A batch with nulls comes back as float64 (NaN): the whole column follows."""
    grown = GrowingColumns(2)
    grown.append({"a": np.array([1, 2], np.int64)})
    grown.append({"a": np.array([np.nan, 4.0])})
    out = grown.finished(("a",))["a"]
    assert out.dtype == np.float64
    assert np.array_equal(out, [1.0, 2.0, np.nan, 4.0], equal_nan=True)


def test_step_samples_of_an_always_busy_engine_are_every_step_but_the_last():
    start = np.cumsum(np.arange(1, 12))
    columns = [np.arange(11) * k for k in (1, 2, 3)]
    samples = step_samples(start, np.ones(11, bool), *columns, 4)
    assert np.array_equal(samples.cycle_ns, np.diff(start))
    for got, column in zip((samples.decode, samples.prefill, samples.context), columns):
        assert np.array_equal(got, column[:-1])
