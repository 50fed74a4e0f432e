"""glibc's allocator, set for a long session: two arenas, freed pages handed back, its heap measured."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


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


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - musl has no such symbol
    except (OSError, AttributeError):
        return None
    return libc
