"""glibc's allocator, set for a long session: two arenas, freed pages handed back, its heap measured; and a mapped
file's pages let go of once read (a load's checkpoint)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterable
from pathlib import Path

# glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2
_MADV_DONTNEED = 4  # sys/mman.h


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Keep glibc's heap to ``count`` arenas for the whole process. By default glibc gives threads that allocate at
    the same time arenas of their own (up to eight per core); over a long session the window's worker threads
    (Qt's pool, torch's) leave each of them fragmented, and RSS grows job after job without coming back (two to
    five times the growth with two arenas: docs/benchmarks.md, soak runs 11 and 12). Called first thing by the
    CLI, the window and the worker processes; ``MALLOC_ARENA_MAX`` in the environment wins. True when set."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, count))


def release_free_memory() -> bool:
    """Hand the pages glibc holds free back to the system (``malloc_trim(0)``), after a job has freed a model or its
    results: free space inside the heap is otherwise kept for reuse and counts as the window's RSS. A few
    milliseconds; True when done."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False


def release_mapped_pages(files: Iterable[Path]) -> int:
    """Let go of this process's resident pages of ``files``' mappings (``madvise(MADV_DONTNEED)``); the bytes let go.

    transformers reads a checkpoint through a mapping and copies each tensor out of it; every page it has read stays
    in the process's RSS until the file is closed at the end of the load, so a load's peak counted the whole
    checkpoint on top of the model it built (a float32 demo checkpoint: 513 MB). The pages stay in the page cache, so
    reading one again costs a minor fault, not the disk. A mapping is let go of only when every page of it is the
    file's own (``/proc/self/pagemap``: none is a private copy that something wrote, resident or swapped), so no
    data can be lost. Linux only; elsewhere 0. For a 0.5 GB checkpoint: 6 ms with nothing resident, 30 ms with all
    of it (beside torch's mappings, on two cores).
    """
    import numpy as np

    wanted = {os.path.realpath(path) for path in files}
    libc = _glibc() if wanted else None
    if libc is None:
        return 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            ranges = [_mapped_range(line) for line in maps]
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    try:
        for start, end, path in filter(None, ranges):
            if path not in wanted:
                continue
            entries = np.frombuffer(os.pread(pagemap, (end - start) // page * 8, start // page * 8), np.uint64)
            present = (entries >> np.uint64(63)) & np.uint64(1)
            swapped = (entries >> np.uint64(62)) & np.uint64(1)
            files_own = (entries >> np.uint64(61)) & np.uint64(1)
            if swapped.any() or (present & (files_own ^ np.uint64(1))).any():
                continue  # a page written into (copy on write): letting go would lose it
            resident = int(present.sum()) * page
            if resident and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
                released += resident
    except OSError:
        pass
    finally:
        os.close(pagemap)
    return released


def _mapped_range(line: str) -> tuple[int, int, str] | None:
    """(start, end, path) of a /proc/self/maps line that maps a file."""
    fields = line.split(maxsplit=5)
    if len(fields) < 6 or not fields[5].startswith("/"):
        return None
    start, _, end = fields[0].partition("-")
    return int(start, 16), int(end, 16), fields[5].rstrip("\n")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def heap_usage() -> dict[str, int] | None:
    """glibc's heap in bytes (``mallinfo2``): ``in_use`` (live allocations, Python's objects among them under
    ``PYTHONMALLOC=malloc``), ``free`` (held inside the heap for reuse), ``mapped`` (blocks mmapped one each); None
    off glibc 2.33+. What the soak splits the window's RSS into."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"in_use": int(info.uordblks), "free": int(info.fordblks), "mapped": int(info.hblkhd)}


@functools.cache  # loaded once: a load asks for it every 30 ms
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - musl has no such symbol
    except (OSError, AttributeError):
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
