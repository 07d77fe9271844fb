"""kvprof's typed errors. The CLI maps them to exit codes in one place (cli/main.py)."""
from __future__ import annotations


class KvprofError(Exception):
    """Base of every error kvprof raises on purpose."""

    exit_code = 1


class UsageError(KvprofError):
    """Bad command-line arguments."""

    exit_code = 2


class TraceFormatError(KvprofError):
    """A file that is not a readable kvprof trace (or a CSV that is not readable)."""

    exit_code = 2


class NewerFormatError(TraceFormatError):
    """A trace written by a newer major format version than this reader knows."""


class UnsupportedVllmVersion(KvprofError):
    """The installed vLLM is outside the range kvprof's hooks were written for."""

    exit_code = 3


class TraceTargetError(KvprofError):
    """The trace cannot be written where asked (missing folder, no permission, exists)."""

    exit_code = 2


class EngineNotTraceable(KvprofError):
    """trace() was given something that is not a vLLM engine kvprof knows."""

    exit_code = 2
