"""The one pass over request_steps: the numba kernel, fed record batch by record batch.

The rows are never all in memory: a streamed trace hands them over one batch at a
time from disk (``Trace.batches``), and every buffer the kernel fills grows on demand
(per-request state as request indices appear, the list of non-adjacent inter-token
gaps when it is full), so the pass needs memory for the steps and the requests, not
for the rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kvprof.analysis.arrays import chunk_values, masked_diff
from kvprof.errors import TraceFormatError

OTHER_GAPS_START = 4096   # entries; doubled whenever the kernel fills it
ROW_DTYPES = {"step": np.int32, "req": np.int32, "phase": np.uint8, "tokens": np.int32,
              "computed": np.int32}


@dataclass
class Replay:
    """What the kernel's pass over request_steps gives back, per step (all steps) and per
    request."""

    context: np.ndarray
    emitted: np.ndarray
    recomputed: int          # tokens recomputed in the selected steps
    itl_values_ns: np.ndarray
    itl_counts: np.ndarray
    req_emitted: np.ndarray  # tokens each request sampled (int32)
    requests_seen: int       # requests with a row in the selected steps
    decode_context: int
    decode_rows: int


def load_kernels():
    """Import numba and load (or compile) the kernel on a tiny input, so that the first real
    call pays nothing; the CLI runs this while another thread reads the trace."""
    from kvprof.analysis import _kernels
    tiny = {name: _readonly(np.zeros(1, dtype)) for name, dtype in ROW_DTYPES.items()}
    per_step, *state = _kernels.new_state(1, 1, 1)
    _kernels.replay_batch(*tiny.values(), 0, 0, np.zeros(1, np.int32), np.zeros(1, np.uint8),
                          np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64),
                          np.zeros(1, np.uint8), *per_step, *state)
    return _kernels


class _RequestState:
    """The kernel's per-request inputs and state, grown when a batch names a new request."""

    def __init__(self, kernels, requests: dict, chosen: np.ndarray, n_steps: int, path: str):
        valid = requests["req"] >= 0
        self.table_rows = requests["req"].size
        known = requests["req"][valid]
        n_req = int(known.max(initial=-1)) + 1
        self._check(n_req - 1, 0, path)
        self.prompt = np.full(n_req, -1, np.int64)
        self.prompt[known] = requests["prompt_tokens"][valid]
        self.delivered = np.full(n_req, np.iinfo(np.int64).max, np.int64)
        finished = valid & (requests["finish_ns"] >= 0)
        self.delivered[requests["req"][finished]] = requests["output_tokens"][finished]
        self.latency_req = np.zeros(n_req, np.uint8)
        self.latency_req[requests["req"][chosen & valid]] = 1
        self.kernels = kernels
        self.per_step, self.per_req, self.other, self.totals = kernels.new_state(n_steps, n_req, OTHER_GAPS_START)

    def fit(self, req: np.ndarray, rows_so_far: int, path: str) -> None:
        """Room for every request index in ``req``; an absurd index is a corrupt trace."""
        top = int(req.max(initial=-1))
        if top < self.prompt.size:
            return
        self._check(top, rows_so_far, path)
        grow = max(top + 1, 2 * self.prompt.size) - self.prompt.size
        self.prompt = np.concatenate([self.prompt, np.full(grow, -1, np.int64)])
        self.delivered = np.concatenate([self.delivered,
                                         np.full(grow, np.iinfo(np.int64).max, np.int64)])
        self.latency_req = np.concatenate([self.latency_req, np.zeros(grow, np.uint8)])
        self.per_req = np.concatenate([self.per_req, self.kernels.new_requests(grow)])

    def _check(self, top: int, rows_so_far: int, path: str) -> None:
        if top > 4 * (self.table_rows + rows_so_far) + 1024:
            raise TraceFormatError(f"{path}: request index {top} is out of range (corrupt trace?)")

    def release(self) -> None:
        """Let the per-request arrays and the gap buffer go (the per-step ones are results)."""
        self.prompt = self.delivered = self.latency_req = self.per_req = self.other = None

    def grow_other(self) -> None:
        self.other = np.concatenate([self.other, np.empty(self.other.size, np.int64)])


def replay(trace, steps: dict, requests: dict, in_window: np.ndarray, chosen: np.ndarray) -> Replay:
    """Run the request-step kernel over the rows, batch by batch, with dense per-request state."""
    from kvprof.format.stream import read_ahead

    kernels = load_kernels()
    step_min, lookup = _step_lookup(steps["step"], trace.path)
    end_ns = np.ascontiguousarray(steps["t_update_end_ns"], np.int64)
    window = in_window.view(np.uint8)    # bool and uint8 share a layout: no copy
    state = _RequestState(kernels, requests, chosen, end_ns.size, trace.path)
    rows_so_far = 0
    for record_batch in read_ahead(trace.batches("request_steps", tuple(ROW_DTYPES))):
        if not record_batch.num_rows:
            continue
        arrays = _batch_arrays(record_batch, trace.path)
        rows_so_far += record_batch.num_rows
        state.fit(arrays[1], rows_so_far, trace.path)
        start = 0
        while start < record_batch.num_rows:
            start = kernels.replay_batch(*arrays, start, step_min, lookup, window, end_ns,
                                         state.prompt, state.delivered, state.latency_req,
                                         *state.per_step, state.per_req, state.other, state.totals)
            if start < record_batch.num_rows:
                state.grow_other()
    return _replay_result(kernels, state, end_ns)


def _replay_result(k, state: _RequestState, end_ns: np.ndarray) -> Replay:
    """ITL as (value, count) pairs: adjacent-step gaps counted per step, the rest one by one.
    What is kept per request is copied out first, so that the (requests x 4) state is
    gone before the pairs are made."""
    totals, (context, emitted, next_gaps) = state.totals, state.per_step
    emitted_per_request = state.per_req[:, k.REQ_EMITTED].astype(np.int32)
    seen = int(state.per_req[:, k.REQ_SEEN].sum())
    other = state.other[:totals[k.TOTAL_OTHER_GAPS]].copy()
    state.release()
    adjacent = next_gaps[1:] > 0      # a mask, not indices: a day's trace has millions of steps
    values = masked_diff(end_ns, adjacent, other)
    counts = np.ones(values.size, np.int32)
    np.compress(adjacent, next_gaps[1:], out=counts[:values.size - other.size])
    return Replay(context, emitted, int(totals[k.TOTAL_RECOMPUTED]), values, counts,
                  emitted_per_request, seen, int(totals[k.TOTAL_DECODE_CONTEXT]),
                  int(totals[k.TOTAL_DECODE_ROWS]))


def _batch_arrays(batch: pa.RecordBatch, path: str) -> list[np.ndarray]:
    """Zero-copy, read-only views of a batch's row columns (one kernel signature for all)."""
    if any(column.null_count for column in batch.columns):
        raise TraceFormatError(f"{path}: request_steps holds nulls in non-nullable columns "
                               f"(corrupt trace?)")
    return [_readonly(chunk_values(batch.column(i), np.dtype(dtype)))
            for i, dtype in enumerate(ROW_DTYPES.values())]


def _readonly(values: np.ndarray) -> np.ndarray:
    values.setflags(write=False)
    return values


def _step_lookup(step_numbers: np.ndarray, path: str) -> tuple[int, np.ndarray]:
    """Dense step number -> position table; refuses numbers too sparse to be a real trace.
    Steps numbered without a gap (increasing, as ``check_order`` made sure) need no table:
    an empty one tells the kernel that a step's position is its number less the first."""
    lo, hi = int(step_numbers.min()), int(step_numbers.max())
    if hi - lo + 1 == step_numbers.size:
        return lo, np.empty(0, np.int32)
    if hi - lo > 4 * step_numbers.size + 1024:
        raise TraceFormatError(f"{path}: step numbers {lo}..{hi} for {step_numbers.size} steps "
                               f"(corrupt trace?)")
    lookup = np.full(hi - lo + 1, -1, np.int32)    # a step's position: < 2^31 steps
    lookup[step_numbers - lo] = np.arange(step_numbers.size, dtype=np.int32)
    return lo, lookup
