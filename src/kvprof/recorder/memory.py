"""Memory readings that are cheap enough for every step.

CPU: this process's resident set from ``/proc/self/statm`` (one ``pread``).
GPU: NVML device memory in use and the torch caching allocator's counters, read
only when torch has already initialised CUDA in this process.
"""
from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class RssReader:
    """Reads the resident set size; keeps the statm file open between reads."""

    def __init__(self):
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = -1

    def read(self) -> int:
        if self._fd < 0:
            return -1
        fields = os.pread(self._fd, 128, 0).split()
        return int(fields[1]) * _PAGE

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def rss_now() -> int:
    """This process's resident set once (a baseline, not a per-step reading)."""
    reader = RssReader()
    try:
        return reader.read()
    finally:
        reader.close()


class GpuReader:
    """NVML and torch allocator readings for the current CUDA device, or nothing."""

    def __init__(self):
        self.available = False
        self._nvml_handle = None
        try:
            import torch
            if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
                return
            self._torch = torch
            self._device = torch.cuda.current_device()
            self.available = True
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._nvml_handle = _nvml_handle(pynvml, torch, self._device)
        except Exception:
            self._nvml_handle = None

    def read(self) -> tuple:
        """(nvml_used, allocated, reserved, peak) in bytes; None where unknown."""
        if not self.available:
            return (None, None, None, None)
        cuda = self._torch.cuda
        used = None
        if self._nvml_handle is not None:
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used
        return (used, cuda.memory_allocated(self._device), cuda.memory_reserved(self._device),
                cuda.max_memory_allocated(self._device))


def _nvml_handle(pynvml, torch, device: int):
    """NVML counts physical GPUs; torch's index is after CUDA_VISIBLE_DEVICES: match by UUID."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + uuid) if not uuid.startswith("GPU-") else uuid)
    except Exception:
        return pynvml.nvmlDeviceGetHandleByIndex(device)
