"""kvprof: a profiler for the internals of vLLM's engine.

``with kvprof.trace(llm, "trace.arrow"): llm.generate(...)`` records every engine
step into a versioned Arrow trace; ``kvprof analyze trace.arrow`` reads it back.
This module imports nothing heavy: vLLM, numba and the analysis load on demand.
"""
from __future__ import annotations

__version__ = "0.1.0"

from kvprof.errors import (  # noqa: E402
    KvprofError, TraceFormatError, TraceTargetError, UnsupportedVllmVersion)


def trace(engine, path, **options):
    """Trace ``engine`` (``LLM``, ``LLMEngine`` or ``AsyncLLM``) into ``path``; see api.Trace."""
    from kvprof.api import Trace
    return Trace(engine, path, **options)


def open_trace(path):
    """Read a trace written by kvprof (see format.reader.Trace)."""
    from kvprof.format.reader import read_trace
    return read_trace(path)


__all__ = ["trace", "open_trace", "KvprofError", "TraceFormatError", "TraceTargetError",
           "UnsupportedVllmVersion", "__version__"]
