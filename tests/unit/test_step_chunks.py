"""Step-ordered sources merged so that every row of a step lands in one chunk."""
from __future__ import annotations

import numpy as np
import pytest

from kvprof.analysis.step_chunks import whole_steps


def _source(steps: np.ndarray, source: int, batch: int):
    rows = {"step": steps, "source": np.full(steps.size, source), "row": np.arange(steps.size)}
    return [{n: c[i:i + batch] for n, c in rows.items()} for i in range(0, steps.size, batch)] + \
        [{n: c[:0] for n, c in rows.items()}]          # an empty batch at the end too


@pytest.mark.parametrize("seed", range(6))
def test_every_row_once_and_each_step_whole(seed):
    rng = np.random.default_rng(seed)
    sources = []
    for k in range(rng.integers(1, 5)):
        steps = np.sort(rng.integers(-2, 60, rng.integers(0, 200)))   # repeats and gaps
        sources.append(_source(steps, k, int(rng.integers(1, 40))))
    keep = lambda c: c["step"] >= 0  # noqa: E731
    chunks = list(whole_steps(sources, keep))
    seen_steps = [set(c["step"].tolist()) for c in chunks]
    for a in range(len(seen_steps)):
        for b in range(a + 1, len(seen_steps)):
            assert not seen_steps[a] & seen_steps[b]          # no step split over chunks
    got = sorted((int(s), int(k), int(r)) for c in chunks
                 for s, k, r in zip(c["step"], c["source"], c["row"]))
    want = sorted((int(s), k, r) for k, src in enumerate(sources) for b in src
                  for s, r in zip(b["step"], b["row"]) if s >= 0)
    assert got == want


def test_one_source_far_behind_holds_back_the_others():
    fast = _source(np.arange(100), 0, 100)
    slow = _source(np.arange(100), 1, 1)
    chunks = list(whole_steps([fast, slow]))
    assert len(chunks) > 50                       # handed out as the slow source moves on
    for chunk in chunks:
        steps, counts = np.unique(chunk["step"], return_counts=True)
        assert (counts == 2).all()
