"""core/memory.py: readings with a fake NVML backend, torch only when initialised, memory attribution."""

from __future__ import annotations

import threading
import time

from lora_studio.core.system import allocator, memory
from lora_studio.core.system.memory import MemorySampler, Reclaimed, SamplingThread, measure_release
from lora_studio.core.system.nvml import GpuReading

GiB = 1024**3


class FakeNvml:
    """Two GPUs whose used memory the test controls (the NvmlBackend protocol)."""

    def __init__(self, count: int = 2) -> None:
        self.used = [1 * GiB * (i + 1) for i in range(count)]
        self.closed = False

    def device_count(self) -> int:
        return len(self.used)

    def read(self, index: int) -> GpuReading:
        return GpuReading(index, f"Fake GPU {index}", self.used[index], 80 * GiB, 10 * index)

    def close(self) -> None:
        self.closed = True


def test_sample_reads_ram_and_each_fake_gpu():
    fake = FakeNvml(2)
    sampler = MemorySampler(fake)
    sample = sampler.sample()
    assert sample.rss_bytes > 10 * 1024**2
    assert 0 < sample.ram_used_bytes <= sample.ram_total_bytes
    assert [g.name for g in sample.gpus] == ["Fake GPU 0", "Fake GPU 1"]
    assert sample.gpu_used_bytes == 3 * GiB
    assert sampler.has_gpus and sampler.gpu_status == ""
    sampler.close()
    assert not fake.closed  # an injected backend belongs to the caller


def test_no_backend_says_no_gpu_and_ram_still_works():
    sampler = MemorySampler(open_nvml=False)
    assert not sampler.has_gpus
    assert "no NVIDIA GPU found" in sampler.gpu_status
    sample = sampler.sample()
    assert sample.gpus == () and sample.rss_bytes > 0


def test_real_backend_path_is_used_when_no_fake_given():
    sampler = MemorySampler()  # this machine has no NVIDIA driver: the reason is stated
    assert sampler.has_gpus or sampler.gpu_status.startswith("no NVIDIA GPU found")
    sampler.close()


def test_torch_readings_empty_without_cuda():
    assert memory.torch_cuda_readings() == ()  # CPU torch (or not imported): nothing, and no CUDA init


def test_broken_gpu_keeps_ram_readings():
    class Broken(FakeNvml):
        def read(self, index):
            raise RuntimeError("fell off the bus")

    sampler = MemorySampler(Broken())
    sample = sampler.sample()
    assert sample.gpus == () and sample.rss_bytes > 0
    assert "stopped" in sampler.gpu_status


def test_measure_release_reports_what_came_back():
    sampler = MemorySampler(open_nvml=False)
    held = {"block": bytearray(96 * 1024**2)}  # touched pages: really resident
    for i in range(0, len(held["block"]), 4096):
        held["block"][i] = 1
    _, reclaimed = measure_release(sampler, lambda: held.clear(), label="dropped block", expected_bytes=96 * 1024**2)
    assert reclaimed.rss_freed_bytes > 64 * 1024**2
    assert not reclaimed.leaked
    assert "dropped block" in reclaimed.message() and "came back" in reclaimed.message()


def test_measure_release_warns_when_nothing_came_back():
    sampler = MemorySampler(open_nvml=False)
    _, reclaimed = measure_release(sampler, lambda: None, label="deleted ghost", expected_bytes=500 * 1024**2)
    assert reclaimed.leaked
    assert "less than expected" in reclaimed.message()


def test_gpu_release_counts_nvml_and_small_releases_are_noise():
    r = Reclaimed("deleted x", 100 * 1024**2, rss_freed_bytes=0, gpu_freed_bytes={"cuda:0": 100 * 1024**2}, on_gpu=True)
    assert r.freed_bytes == 100 * 1024**2 and not r.leaked and "GPU" in r.message()
    assert not Reclaimed("tiny", 1024, rss_freed_bytes=0).leaked


def test_sampling_thread_delivers_and_stops():
    got = []
    thread = SamplingThread(MemorySampler(FakeNvml(1)), got.append, interval_s=0.01).start()
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.stop()
    assert len(got) >= 3 and got[0].gpus[0].name == "Fake GPU 0"
    assert not any(t.name == "lora-studio-memory" for t in threading.enumerate())


def test_format_bytes():
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(3.5 * 1024) == "3.5 KiB"
    assert memory.format_bytes(2 * GiB) == "2.00 GiB"


def test_the_heap_is_kept_to_two_arenas_unless_the_environment_says(monkeypatch):
    """glibc's mallopt(M_ARENA_MAX) takes effect for the arenas made after it (a soak's RSS growth: docs/benchmarks.md);
    MALLOC_ARENA_MAX set by the user is left to glibc."""
    import sys

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert allocator.limit_malloc_arenas() is sys.platform.startswith("linux")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.limit_malloc_arenas() is False


def test_freed_pages_are_handed_back_and_the_heap_is_measured():
    """malloc_trim when the window's jobs end; mallinfo2 for the soak's split of the RSS (glibc only)."""
    import sys

    linux = sys.platform.startswith("linux")
    assert allocator.release_free_memory() is linux
    heap = allocator.heap_usage()
    assert heap is None if not linux else heap["in_use"] > 0 and set(heap) == {"in_use", "free", "mapped"}
