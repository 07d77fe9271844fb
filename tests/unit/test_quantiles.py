"""The mergeable percentile summary: numpy's answer while exact, within its bound after."""
import numpy as np
import pytest

from kvprof.analysis.quantiles import RELATIVE_ERROR, Quantiles

QS = (0, 1, 50, 90, 99, 99.9, 100)


def _values(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.lognormal(15, 1.5, n - n // 10), np.zeros(n // 20),
                           rng.integers(1, 10, n // 10 - n // 20).astype(float)])


def test_below_the_cap_it_is_numpy_exactly():
    values = _values(10_000)
    q = Quantiles(exact_max=10_000)
    for part in np.array_split(values, 7):
        q.add(part)
    assert q.exact and q.count == values.size
    assert q.percentiles(QS) == [float(v) for v in np.percentile(values, QS)]
    assert (q.min, q.max) == (values.min(), values.max())
    assert q.mean == pytest.approx(values.mean(), rel=1e-12)


@pytest.mark.parametrize("split", [1, 3, 50])
def test_folded_percentiles_stay_within_the_stated_error(split):
    values = _values(200_000, seed=split)
    q = Quantiles(exact_max=1_000)
    for part in np.array_split(values, split):
        q.add(part)
    assert not q.exact and q.count == values.size
    for got, want in zip(q.percentiles(QS), np.percentile(values, QS)):
        assert abs(got - want) <= RELATIVE_ERROR * want + 1e-9, (got, want)
    assert q.percentiles((0, 100)) == [values.min(), values.max()]


def test_merge_equals_one_summary_of_all_values():
    a, b, c = _values(5_000, 1), _values(50_000, 2), _values(700, 3)
    merged = Quantiles(exact_max=20_000)
    for part in (a, b, c):
        one = Quantiles(exact_max=20_000)
        one.add(part)
        merged.merge(one)
    whole = Quantiles(exact_max=20_000)
    whole.add(np.concatenate([a, b, c]))
    assert merged.count == whole.count and not merged.exact
    assert merged.percentiles(QS) == whole.percentiles(QS)
    small = Quantiles()
    for part in (a, c):
        one = Quantiles()
        one.add(part)
        small.merge(one)
    assert small.exact
    assert small.percentiles(QS) == [float(v) for v in np.percentile(np.concatenate([a, c]), QS)]


def test_refuses_negative_values_and_empty_questions():
    q = Quantiles()
    with pytest.raises(ValueError):
        q.percentiles((50,))
    with pytest.raises(ValueError):
        q.add(np.array([1.0, -1.0]))


@pytest.mark.parametrize("exact_max", [10_000, 50])
def test_values_with_counts_are_the_repeated_values(exact_max):
    """A value seen c times (one step's inter-token gaps) counts c times: exact while the
    distinct values fit, within the bound after; counts, sums and extremes exact."""
    rng = np.random.default_rng(exact_max)
    values = _values(2_000, seed=7)
    counts = rng.integers(0, 40, values.size)
    repeated = np.repeat(values, counts)
    q = Quantiles(exact_max=exact_max)
    for v, c in zip(np.array_split(values, 5), np.array_split(counts, 5)):
        q.add(v, c)
    q.add(values[:3])                                  # plain values mix in
    repeated = np.concatenate([repeated, values[:3]])
    assert q.count == repeated.size and q.mean == pytest.approx(repeated.mean(), rel=1e-12)
    want = np.percentile(repeated, QS)
    if exact_max > values.size:
        assert q.exact and q.percentiles(QS) == [float(v) for v in want]
    else:
        assert not q.exact
        for got, w in zip(q.percentiles(QS), want):
            assert abs(got - w) <= RELATIVE_ERROR * w + 1e-9, (got, w)


@pytest.mark.parametrize("exact_max", [10_000, 50])
def test_state_round_trip_keeps_every_answer(exact_max):
    q = Quantiles(exact_max=exact_max)
    q.add(_values(3_000, 4), np.arange(3_000) % 3)
    back = Quantiles.from_state(q.state())
    assert (back.count, back.total, back.min, back.max, back.exact) == \
        (q.count, q.total, q.min, q.max, q.exact)
    assert back.percentiles(QS) == q.percentiles(QS)
    empty = Quantiles.from_state(Quantiles().state())
    assert empty.count == 0 and empty.exact
