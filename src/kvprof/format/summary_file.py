"""Summary files: a trace's mergeable results (``analysis/summary.py``) on disk.

An Arrow IPC file (schema ``format.schema.SUMMARY``): one row per latency kind, the
totals as JSON in the schema metadata beside the summary version. A file that is not
a summary, or one of a newer major version, is one ``TraceFormatError`` line.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from kvprof.analysis.latency import KINDS
from kvprof.analysis.quantiles import Quantiles
from kvprof.analysis.summary import TOKEN_KINDS, TraceSummary
from kvprof.errors import NewerFormatError, TraceFormatError, TraceTargetError
from kvprof.format import schema as S


def write_summary(summary: TraceSummary, path: str) -> None:
    states = [summary.latency_ms[kind].state() for kind in KINDS]
    totals = {"traces": summary.traces, "steps": summary.steps, "duration_s": summary.duration_s,
              "requests_finished": summary.requests_finished, "tokens": summary.tokens}
    schema = pa.schema(S.SUMMARY, metadata={S.META_SUMMARY_VERSION: S.SUMMARY_VERSION.encode(),
                                            S.META_SUMMARY: json.dumps(totals).encode()})
    columns = {"kind": list(KINDS),
               **{k: [s[k] for s in states] for k in ("count", "total", "exact_max")},
               # an empty summary's min and max are infinite: stored as 0, count 0 says why
               **{k: [s[k] if math.isfinite(s[k]) else 0.0 for s in states] for k in ("min", "max")},
               **{k: [s[k] for s in states] for k in ("values", "counts", "buckets")}}
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in S.SUMMARY}, schema=schema)
    try:
        with pa.OSFile(path, "wb") as sink, ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
    except OSError as exc:
        raise TraceTargetError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_summary(path: str) -> TraceSummary:
    if not os.path.isfile(path):
        raise TraceFormatError(f"{path}: no such summary file")
    try:
        with pa.OSFile(path, "rb") as source:     # in memory, not mapped: merge may
            table = ipc.open_file(source).read_all()   # write over one of its inputs
    except (pa.ArrowException, OSError) as exc:
        raise TraceFormatError(f"{path}: not a kvprof summary (make one with kvprof analyze "
                               f"TRACE --summary OUT; {str(exc).splitlines()[0]})") from None
    meta = table.schema.metadata or {}
    version = meta.get(S.META_SUMMARY_VERSION, b"").decode()
    if not version:
        raise TraceFormatError(f"{path}: not a kvprof summary (make one with kvprof analyze "
                               f"TRACE --summary OUT)")
    if version.split(".")[0] != S.SUMMARY_VERSION.split(".")[0]:
        raise NewerFormatError(f"{path}: summary version {version}; this kvprof reads "
                               f"{S.SUMMARY_VERSION.split('.')[0]}.x")
    try:
        return _summary(table, json.loads(meta[S.META_SUMMARY]))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise TraceFormatError(f"{path}: damaged kvprof summary ({exc})") from None


def _summary(table: pa.Table, totals: dict) -> TraceSummary:
    kinds = table.column("kind").to_pylist()
    latency = {}
    for kind in KINDS:
        i = kinds.index(kind)
        row = {name: table.column(name)[i] for name in table.column_names}
        state = {name: row[name].as_py() for name in ("count", "total", "min", "max", "exact_max")}
        for name in ("values", "counts", "buckets"):
            state[name] = row[name].values.to_numpy(zero_copy_only=False) if row[name].is_valid else None
        if not state["count"]:
            state["min"], state["max"] = math.inf, -math.inf
        latency[kind] = Quantiles.from_state(state)
    return TraceSummary([str(t) for t in totals["traces"]], int(totals["steps"]),
                        float(totals["duration_s"]), int(totals["requests_finished"]),
                        {kind: int(totals["tokens"][kind]) for kind in TOKEN_KINDS}, latency)
