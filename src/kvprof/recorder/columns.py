"""Column buffers the hooks append to: plain ``array.array`` per numeric column.

``array.array.append``/``extend`` cost about as much as a list's, and the writer
thread turns them into Arrow arrays without touching Python objects, so the
engine thread pays for integer appends only.
"""
from __future__ import annotations

import array

import numpy as np
import pyarrow as pa

_TYPECODES = {pa.int8(): "b", pa.uint8(): "B", pa.int16(): "h", pa.int32(): "i", pa.int64(): "q"}


class ColumnBuffer:
    """One table's pending rows, column by column; ``swap()`` hands them off whole."""

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

    def swap(self) -> list:
        """Take the pending columns, leaving empty ones for the next rows."""
        taken = self.columns
        self._fresh()
        return taken


def to_record_batch(fields: list[pa.Field], columns: list) -> pa.RecordBatch:
    """Build an Arrow batch from swapped columns (runs on the writer thread)."""
    arrays = []
    for field, col in zip(fields, columns):
        if isinstance(col, array.array):
            arrays.append(pa.array(np.frombuffer(col, dtype=field.type.to_pandas_dtype())))
        else:
            arrays.append(pa.array(col, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
