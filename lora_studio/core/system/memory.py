"""Live memory readings and memory attribution, headless.

A :class:`MemorySampler` reads, on demand, the process RSS and system RAM
(psutil), each NVIDIA GPU through an :class:`~lora_studio.core.system.nvml.NvmlBackend`
(the real pynvml one unless a test injects a fake), and torch's allocated/reserved
bytes per CUDA device — the latter only when torch is already imported and CUDA
initialised, so sampling never drags torch in or creates a CUDA context.

:func:`measure_release` answers the question users of other tools keep asking
("did deleting that adapter give the memory back?"): it samples before and after
an unload, trims the C heap so freed blocks really go back to the OS, and says
how much came back and whether that matches what should have.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lora_studio.core.system import garbage, nvml
from lora_studio.core.system.child_process import running_workers
from lora_studio.core.system.devices import mps_memory

MiB = 1024**2
GiB = 1024**3
# Below this an expected release is lost in allocator noise: do not warn about it.
NOISE_FLOOR_BYTES = 8 * MiB
# A release that returns less than this share of what it should is reported as a possible leak.
RECLAIM_WARN_FRACTION = 0.5


@dataclass(frozen=True)
class TorchCudaReading:
    device: str  # "cuda:N", or "mps" (Apple silicon: reserved is the Metal driver's allocations, in the shared RAM)
    allocated_bytes: int
    reserved_bytes: int


@dataclass(frozen=True)
class MemorySample:
    time: float  # time.monotonic()
    rss_bytes: int  # this process
    ram_used_bytes: int  # whole system: total - available
    ram_total_bytes: int
    gpus: tuple[nvml.GpuReading, ...] = ()
    torch_cuda: tuple[TorchCudaReading, ...] = ()
    # The RSS split (Linux; 0 when unknown): memory only this process has (heap, tensors it computed) vs pages of
    # mapped files (safetensors weights loaded by mmap, libraries). File pages count in RSS, but the system counts
    # clean ones as page cache, i.e. "available" - which is why RSS can exceed the system's "used" RAM.
    rss_anon_bytes: int = 0
    rss_file_bytes: int = 0  # file-backed and shared memory pages (RssFile + RssShmem)
    workers_rss_bytes: int = 0  # the worker processes of running jobs (a training run's), together

    @property
    def gpu_used_bytes(self) -> int:
        return sum(g.used_bytes for g in self.gpus)

    @property
    def has_rss_split(self) -> bool:
        return self.rss_anon_bytes > 0 or self.rss_file_bytes > 0


def read_rss_split(status_path: str = "/proc/self/status") -> tuple[int, int]:
    """(anonymous, file-backed + shared) resident bytes of this process from /proc; (0, 0) where there is none."""
    values: dict[str, int] = {}
    try:
        with open(status_path, encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    values[key] = int(rest.split()[0]) * 1024  # "kB"
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("RssAnon", 0), values.get("RssFile", 0) + values.get("RssShmem", 0)


def torch_cuda_readings() -> tuple[TorchCudaReading, ...]:
    """torch's own view of GPU memory: each initialised CUDA device, and mps where it runs; empty unless torch is
    imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    mps = mps_memory()
    on_mps = (TorchCudaReading("mps", *mps),) if mps is not None else ()
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return on_mps
        return on_mps + tuple(
            TorchCudaReading(f"cuda:{i}", int(torch.cuda.memory_allocated(i)), int(torch.cuda.memory_reserved(i)))
            for i in range(torch.cuda.device_count())
        )
    except Exception:  # noqa: BLE001 - a broken driver must not stop the RAM readings
        return ()


class MemorySampler:
    """Reads memory now. Thread-safe: one reading at a time.

    ``backend``: an NVML backend to use (tests pass a fake). When omitted the real
    one is opened with :func:`nvml.open_backend`; when that fails, ``gpu_status``
    says why ("no NVIDIA GPU found ...") and the GPU part stays empty.
    """

    def __init__(self, backend: nvml.NvmlBackend | None = None, *, open_nvml: bool = True) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._owns_backend = backend is None
        if backend is None and open_nvml:
            backend, reason = nvml.open_backend()
        else:
            reason = "" if backend is not None else "no NVIDIA GPU found"
        self._backend = backend
        self.gpu_status = reason
        self._has_proc_status = sys.platform.startswith("linux")

    @property
    def has_gpus(self) -> bool:
        return self._backend is not None

    def gpu_names(self) -> list[str]:
        return [g.name for g in self.read_gpus()]

    def read_gpus(self) -> tuple[nvml.GpuReading, ...]:
        if self._backend is None:
            return ()
        try:
            return tuple(nvml.read_all(self._backend))
        except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus: say so, keep the rest working
            self.gpu_status = f"GPU readings stopped ({type(exc).__name__})"
            return ()

    def sample(self) -> MemorySample:
        with self._lock:
            vm = self._psutil.virtual_memory()
            rss = int(self._process.memory_info().rss)
            anon, file_backed = read_rss_split() if self._has_proc_status else (0, 0)
            workers = self._workers_rss()
            return MemorySample(
                time.monotonic(),
                rss,
                int(vm.total - vm.available),
                int(vm.total),
                self.read_gpus(),
                torch_cuda_readings(),
                anon,
                file_backed,
                workers,
            )

    def _workers_rss(self) -> int:
        total = 0
        for pid in running_workers():
            try:
                total += int(self._psutil.Process(pid).memory_info().rss)
            except self._psutil.Error:  # it ended between the two calls
                continue
        return total

    def close(self) -> None:
        with self._lock:
            if self._backend is not None and self._owns_backend:
                self._backend.close()
            self._backend = None


class SamplingThread:
    """Calls ``on_sample(sampler.sample())`` every ``interval_s`` on a daemon thread until :meth:`stop`."""

    def __init__(
        self, sampler: MemorySampler, on_sample: Callable[[MemorySample], None], interval_s: float = 0.25
    ) -> None:
        self.sampler = sampler
        self.interval_s = interval_s
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lora-studio-memory", daemon=True)

    def start(self) -> SamplingThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            # a thread boundary: a failed reading is skipped, the next one may work
            with contextlib.suppress(Exception):
                self._on_sample(self.sampler.sample())
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)


def trim_heap(collect: bool = True) -> None:
    """Ask glibc to hand freed heap pages back to the OS, so RSS shows what was really freed."""
    from lora_studio.core.system.allocator import release_free_memory

    if collect:
        garbage.collect()  # ~0.3 s with torch loaded: once per measurement, not more
    release_free_memory()  # a no-op off glibc (musl and others have no malloc_trim)


@dataclass(frozen=True)
class Reclaimed:
    """How much memory an unload gave back."""

    label: str  # "deleted alpha", "unloaded all adapters"
    expected_bytes: int  # what should have come back (the adapters' own sizes)
    rss_freed_bytes: int  # process RSS before - after (negative: it grew)
    gpu_freed_bytes: dict[str, int] = field(default_factory=dict)  # "cuda:N" -> used before - after
    torch_freed_bytes: dict[str, int] = field(default_factory=dict)  # "cuda:N" -> allocated before - after
    on_gpu: bool = False  # the released tensors lived on a GPU

    @property
    def freed_bytes(self) -> int:
        if self.on_gpu and self.torch_freed_bytes:
            return sum(self.torch_freed_bytes.values())
        if self.on_gpu and self.gpu_freed_bytes:
            return sum(self.gpu_freed_bytes.values())
        return self.rss_freed_bytes

    @property
    def leaked(self) -> bool:
        """True when clearly less came back than should have."""
        if self.expected_bytes < NOISE_FLOOR_BYTES:
            return False
        return self.freed_bytes < self.expected_bytes * RECLAIM_WARN_FRACTION

    def message(self) -> str:
        where = "GPU" if self.on_gpu else "RAM"
        text = f"{self.label}: {format_bytes(max(0, self.freed_bytes))} of {where} came back"
        if self.expected_bytes:
            text += f" (expected {format_bytes(self.expected_bytes)})"
        if self.leaked:
            text += " — less than expected: something still holds the tensors (a leak, or the allocator kept them)"
        return text


def measure_release(
    sampler: MemorySampler,
    release: Callable[[], object],
    *,
    label: str,
    expected_bytes: int = 0,
    on_gpu: bool = False,
    settle_s: float = 0.0,
) -> tuple[object, Reclaimed]:
    """Run ``release()`` (a delete or unload) between two samples; return its result and what came back."""
    trim_heap(collect=False)
    before = sampler.sample()
    result = release()
    trim_heap(collect=True)
    if settle_s:
        time.sleep(settle_s)
    after = sampler.sample()
    gpu_before = {f"cuda:{g.index}": g.used_bytes for g in before.gpus}
    gpu_freed = {
        f"cuda:{g.index}": gpu_before[f"cuda:{g.index}"] - g.used_bytes
        for g in after.gpus
        if f"cuda:{g.index}" in gpu_before
    }
    torch_before = {t.device: t.allocated_bytes for t in before.torch_cuda}
    torch_freed = {
        t.device: torch_before[t.device] - t.allocated_bytes for t in after.torch_cuda if t.device in torch_before
    }
    return result, Reclaimed(
        label, int(expected_bytes), before.rss_bytes - after.rss_bytes, gpu_freed, torch_freed, on_gpu
    )


def format_bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
