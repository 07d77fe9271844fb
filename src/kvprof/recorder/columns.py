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


class RowBuffer:
    """Rows as tuples in schema order."""

    def __init__(self, table: str, fields: list[pa.Field]):
        self.table = table
        self.fields = fields
        self.rows: list[tuple] = []
        self.append = self.rows.append

    def __len__(self) -> int:
        return len(self.rows)

    def take(self):
        """(builder, row count) for the writer thread; the buffer starts empty again."""
        rows, self.rows = self.rows, []
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
    arrays = []
    for field, col in zip(fields, columns):
        if isinstance(col, array.array):
            arrays.append(pa.array(np.frombuffer(col, dtype=field.type.to_pandas_dtype())))
        else:
            arrays.append(pa.array(col, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def rows_to_batch(fields: list[pa.Field], rows: list[tuple]) -> pa.RecordBatch:
    if not rows:
        return pa.RecordBatch.from_pylist([], schema=pa.schema(fields))
    columns = zip(*rows)
    arrays = [pa.array(col, type=f.type) for f, col in zip(fields, columns)]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
