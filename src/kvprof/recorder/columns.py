"""Buffers the hooks append to, and their conversion to Arrow on the writer thread.

Two shapes, chosen by how often a table grows:
- ``RowBuffer``: one tuple per row (one ``list.append`` in the hook) for tables
  that grow every step; the writer thread transposes the tuples.
- ``ColumnBuffer``: one ``array.array`` per column, for rare rows that a hook may
  need to patch in place (block events get their request attributed later).
The engine thread only appends; everything that builds Arrow arrays runs on the
writer thread through the ``builder`` callables these buffers hand over.
"""
from __future__ import annotations

import array
import functools

import numpy as np
import pyarrow as pa

_TYPECODES = {pa.int8(): "b", pa.uint8(): "B", pa.int16(): "h", pa.int32(): "i", pa.int64(): "q"}
# Not field.type.to_pandas_dtype(): that imports pandas into the engine's process.
_NUMPY = {pa.int8(): np.int8, pa.uint8(): np.uint8, pa.int16(): np.int16, pa.int32(): np.int32,
          pa.int64(): np.int64}


class RowBuffer:
    """Rows as tuples in schema order."""

    def __init__(self, table: str, fields: list[pa.Field]):
        self.table = table
        self.fields = fields
        self.rows: list[tuple] = []
        self.append = self.rows.append

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, upto: int | None = None):
        """(builder, row count) of the first ``upto`` rows (all by default) for the writer
        thread; the rest stay buffered."""
        if upto is None or upto >= len(self.rows):
            rows, self.rows = self.rows, []
        else:
            rows, self.rows = self.rows[:upto], self.rows[upto:]
        self.append = self.rows.append
        return functools.partial(rows_to_batch, self.fields, rows), len(rows)


class ColumnBuffer:
    """One array per column; ``take()`` hands them off whole."""

    def __init__(self, table: str, fields: list[pa.Field]):
        self.table = table
        self.fields = fields
        self.names = [f.name for f in fields]
        self._codes = [None if f.nullable else _TYPECODES.get(f.type) for f in fields]
        self.columns: list = []
        self._fresh()

    def _fresh(self) -> None:
        self.columns = [array.array(code) if code else [] for code in self._codes]
        for name, col in zip(self.names, self.columns):
            setattr(self, name, col)

    def __len__(self) -> int:
        return len(self.columns[0])

    def append_row(self, *values) -> None:
        for col, value in zip(self.columns, values):
            col.append(value)

    def take(self):
        columns = self.columns
        self._fresh()
        return functools.partial(columns_to_batch, self.fields, columns), len(columns[0])


def columns_to_batch(fields: list[pa.Field], columns: list) -> pa.RecordBatch:
    arrays = [_column(f, col) for f, col in zip(fields, columns)]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def rows_to_batch(fields: list[pa.Field], rows: list[tuple]) -> pa.RecordBatch:
    if not rows:
        return pa.RecordBatch.from_arrays([_column(f, ()) for f in fields], schema=pa.schema(fields))
    arrays = [_column(f, col) for f, col in zip(fields, zip(*rows))]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


# Arrays are assembled from buffers: ``pa.array`` imports pandas on first use, which
# would cost the engine's process about a second of CPU under its GIL.
def _column(field: pa.Field, values) -> pa.Array:
    typ = field.type
    n = len(values)
    if typ in _NUMPY:
        if isinstance(values, np.ndarray):
            data = values.astype(_NUMPY[typ], copy=False)
        elif isinstance(values, array.array):
            data = np.frombuffer(values, dtype=_NUMPY[typ])
        elif None in values:
            return _nullable_ints(typ, values)
        else:
            data = np.array(values, dtype=_NUMPY[typ])
        return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(data)])
    if typ == pa.string():
        return _strings(values)
    if pa.types.is_list(typ):
        flat = np.fromiter((x for v in values for x in v), _NUMPY[typ.value_type])
        inner = pa.Array.from_buffers(typ.value_type, len(flat), [None, pa.py_buffer(flat)])
        return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(_offsets(map(len, values), n))],
                                     children=[inner])
    raise TypeError(f"kvprof cannot buffer column type {typ}")


def _offsets(lengths, n: int) -> np.ndarray:
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.fromiter(lengths, np.int32, n), out=offsets[1:])
    return offsets


def _strings(values) -> pa.Array:
    data = [str(v).encode() for v in values]
    return pa.Array.from_buffers(pa.string(), len(data), [
        None, pa.py_buffer(_offsets(map(len, data), len(data))), pa.py_buffer(b"".join(data))])


def _nullable_ints(typ: pa.DataType, values) -> pa.Array:
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    data = np.array([0 if v is None else v for v in values], dtype=_NUMPY[typ])
    bitmap = np.packbits(valid, bitorder="little")
    return pa.Array.from_buffers(typ, len(values), [pa.py_buffer(bitmap), pa.py_buffer(data)],
                                 null_count=int(len(values) - valid.sum()))
