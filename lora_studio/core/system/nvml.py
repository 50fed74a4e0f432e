"""NVIDIA GPUs through NVML, behind a small interface.

:class:`NvmlBackend` is what the rest of the app sees. The real backend wraps
``pynvml`` (package ``nvidia-ml-py``); tests pass a fake one. When NVML cannot be
initialised (no driver, no GPU, library missing) :func:`open_backend` returns
``None`` with the reason, and callers say "no NVIDIA GPU found".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    utilization_percent: int | None

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)


class NvmlBackend(Protocol):
    def device_count(self) -> int: ...
    def read(self, index: int) -> GpuReading: ...
    def close(self) -> None: ...


class PynvmlBackend:
    """The real thing: NVML via pynvml."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._names = []
        for h in self._handles:
            name = pynvml.nvmlDeviceGetName(h)
            self._names.append(name.decode() if isinstance(name, bytes) else str(name))

    def device_count(self) -> int:
        return len(self._handles)

    def read(self, index: int) -> GpuReading:
        h = self._handles[index]
        mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
        try:
            util = int(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except self._nvml.NVMLError:  # some devices (MIG slices) report no utilisation
            util = None
        return GpuReading(index, self._names[index], int(mem.used), int(mem.total), util)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best-effort cleanup: a failed shutdown changes nothing for us
            self._nvml.nvmlShutdown()


def open_backend() -> tuple[NvmlBackend | None, str]:
    """The real backend, or None and a sentence saying why there is none."""
    try:
        backend = PynvmlBackend()
    except ImportError:
        return None, "no NVIDIA GPU found (the nvidia-ml-py package is not installed)"
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: all mean no GPU
        return None, f"no NVIDIA GPU found ({type(exc).__name__})"
    if backend.device_count() == 0:
        backend.close()
        return None, "no NVIDIA GPU found"
    return backend, ""


def read_all(backend: NvmlBackend | None) -> list[GpuReading]:
    if backend is None:
        return []
    return [backend.read(i) for i in range(backend.device_count())]
