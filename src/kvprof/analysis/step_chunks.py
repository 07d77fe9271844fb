"""Rows of several step-ordered sources, handed out a set of whole steps at a time.

Each worker rank writes its own forward file, in step order. A step's rows from all
ranks are therefore spread over several files; reading the files side by side, a step
is complete once every file has been read past it. ``whole_steps`` does that merge
with one record batch per file in memory, so the rank analysis needs no more than a
few batches whatever the trace's length.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np

Chunk = dict[str, np.ndarray]


def whole_steps(sources: list[Iterable[Chunk]], keep=None) -> Iterator[Chunk]:
    """Chunks of rows (the sources' columns) such that every row of a step is in the
    same chunk. Each source must be in non-decreasing step order; ``keep(chunk)`` -> a
    mask of the rows to use (applied as they are read)."""
    readers = [iter(source) for source in sources]
    pending: list[list[Chunk]] = [[] for _ in readers]
    last: list[float] = [-math.inf] * len(readers)    # the last step read from each
    live = set(range(len(readers)))
    while live:
        behind = min(live, key=lambda i: last[i])
        chunk = next(readers[behind], None)
        if chunk is None:
            live.discard(behind)
        else:
            chunk = _kept(chunk, keep)
            if chunk["step"].size:    # (an empty one: this source is read again next)
                pending[behind].append(chunk)
                last[behind] = int(chunk["step"][-1])
        mark = min((last[i] for i in live), default=math.inf)
        ready = _take_below(pending, mark)
        if ready is not None:
            yield ready


def _kept(chunk: Chunk, keep) -> Chunk:
    if keep is None:
        return chunk
    mask = keep(chunk)
    return chunk if mask.all() else {name: column[mask] for name, column in chunk.items()}


def _take_below(pending: list[list[Chunk]], mark: float) -> Chunk | None:
    """Remove and return (joined) every pending row of a step below ``mark``."""
    taken: list[Chunk] = []
    for chunks in pending:
        while chunks:
            step = chunks[0]["step"]
            cut = int(np.searchsorted(step, mark, side="left")) if mark != math.inf else step.size
            if cut == 0:
                break
            head = chunks[0] if cut == step.size else {n: c[:cut] for n, c in chunks[0].items()}
            taken.append(head)
            if cut == step.size:
                chunks.pop(0)
            else:
                chunks[0] = {n: c[cut:] for n, c in chunks[0].items()}
                break
    if not taken:
        return None
    return {name: np.concatenate([chunk[name] for chunk in taken]) for name in taken[0]}
