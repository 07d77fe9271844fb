"""Arrow <-> NumPy without pandas: the analyzer's columns are plain integer arrays."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def columns(table: pa.Table, names=None) -> dict[str, np.ndarray]:
    """Writable NumPy copies of a table's (integer) columns, by name."""
    return {name: numpy_column(table.column(name)) for name in names or table.column_names}


def batch_columns(batches, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Writable NumPy columns from record batches read one at a time: each batch's values
    are copied out and the batch let go, so the table is never in memory twice."""
    grown = GrowingColumns()
    for batch in batches:
        grown.append({name: numpy_column(pa.chunked_array([batch.column(name)]))
                      for name in names})
    return grown.finished(names)


def joined(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Each column's pieces joined and let go one column at a time, so that the pieces
    and the result are never all in memory together. Empties ``parts``."""
    out = {}
    for name in list(parts):
        pieces = parts.pop(name)
        out[name] = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
    return out


class GrowingColumns:
    """Columns appended batch by batch into one array each, grown by doubling and
    trimmed in place: no per-batch pieces to join, so a long trace's pieces and the
    joined column never exist side by side. A large array is a mapping of its own,
    whose unwritten tail is never resident and which goes back to the system when let go."""

    def __init__(self, capacity: int = 1 << 16):
        self._arrays: dict[str, np.ndarray] = {}
        self._capacity, self.size = capacity, 0

    def append(self, columns: dict[str, np.ndarray]) -> None:
        n = len(next(iter(columns.values()), ()))
        if self.size + n > self._capacity:
            self._capacity = max(2 * self._capacity, self.size + n)
            for name, old in self._arrays.items():
                self._arrays[name] = np.empty(self._capacity, old.dtype)
                self._arrays[name][:self.size] = old[:self.size]
        for name, values in columns.items():
            if name not in self._arrays:
                self._arrays[name] = np.empty(self._capacity, values.dtype)
            elif values.dtype != self._arrays[name].dtype:   # a batch with nulls: float64
                wider = np.result_type(values.dtype, self._arrays[name].dtype)
                self._arrays[name] = self._arrays[name].astype(wider)
            self._arrays[name][self.size:self.size + n] = values
        self.size += n

    def finished(self, names) -> dict[str, np.ndarray]:
        """The columns, trimmed in place to their length (empty int64 for a column never
        appended). Empties this object."""
        out = {}
        for name in names:
            values = self._arrays.pop(name, None)
            if values is None:
                out[name] = np.empty(0, np.int64)
                continue
            values.resize(self.size, refcheck=False)   # shrinks the mapping, no copy
            out[name] = values
        return out


def numpy_column(column: pa.ChunkedArray) -> np.ndarray:
    """A writable NumPy copy of an integer column, straight from its buffers.

    pyarrow's own ``to_numpy`` imports pandas (0.4 s here); nulls become NaN (float64)."""
    typ = column.type
    dtype = np.dtype(f"{'i' if pa.types.is_signed_integer(typ) else 'u'}{typ.bit_width // 8}")
    parts = [chunk_values(chunk, dtype) for chunk in column.chunks if len(chunk)]
    if column.null_count:
        return np.concatenate(parts or [np.empty(0)]).astype(np.float64, copy=False)
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def chunk_values(chunk: pa.Array, dtype: np.dtype) -> np.ndarray:
    validity, data = chunk.buffers()[:2]
    values = np.frombuffer(data, dtype, len(chunk), chunk.offset * dtype.itemsize)
    if not chunk.null_count:
        return values
    bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
    return np.where(bits[chunk.offset:chunk.offset + len(chunk)].astype(bool), values, np.nan)


def arrow_column(values: np.ndarray) -> pa.Array:
    """A NumPy array as an Arrow array without pandas; NaN becomes null."""
    values = np.ascontiguousarray(values)
    validity = None
    if values.dtype.kind == "f" and np.isnan(values).any():
        validity = pa.py_buffer(np.packbits(~np.isnan(values), bitorder="little"))
    typ = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(typ, len(values), [validity, pa.py_buffer(values)])


def arrow_table(columns: dict) -> pa.Table:
    return pa.table({name: c if isinstance(c, (pa.Array, pa.ChunkedArray)) else arrow_column(c)
                     for name, c in columns.items()})


def masked_diff(values: np.ndarray, keep: np.ndarray, tail: np.ndarray | None = None,
                chunk: int = 1 << 20) -> np.ndarray:
    """``np.diff(values)[keep]`` (``keep`` has one entry per difference) followed by
    ``tail``, made a chunk at a time into one array: a long trace's whole difference
    array and the joined copy never exist beside the result."""
    tail = np.empty(0, np.int64) if tail is None else tail
    n = int(np.count_nonzero(keep))
    out = np.empty(n + tail.size, np.result_type(values.dtype, tail.dtype))
    filled = 0
    for lo in range(0, keep.size, chunk):
        hi = min(lo + chunk, keep.size)
        piece = np.diff(values[lo:hi + 1])[keep[lo:hi]]
        out[filled:filled + piece.size] = piece
        filled += piece.size
    out[n:] = tail
    return out
