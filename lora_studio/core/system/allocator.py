"""The allocators, set for a long session: glibc's arenas, Python's small objects, freed pages handed back."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


# Python's small-object allocator (pymalloc) returns an arena to the system only when every object in it is gone.
# Loading a model, attaching an adapter and freeing both leaves a few long-lived objects (library caches, interned
# names) scattered over the arenas the model's objects filled, and the window's RSS grew about 0.3 MiB a cycle of
# the soak, load after load, with no object count growing. Served by glibc instead, the same cycle stays level and
# malloc_trim hands the freed pages back (docs/benchmarks.md, "The allocator and the Log dock").
SYSTEM_ALLOCATOR_ENV = "PYTHONMALLOC"
SYSTEM_ALLOCATOR = "malloc"
# Set beside PYTHONMALLOC by the restart: the window chose glibc's allocator, its worker processes go back to Python's
_CHOSEN_FOR_THE_WINDOW = "LORA_STUDIO_WINDOW_ALLOCATOR"
_SPAWN_LOCK = threading.Lock()


def restart_with_system_allocator() -> None:
    """Run this process again, the same command, with ``PYTHONMALLOC=malloc``: for the window, a process that lives
    all day. ``PYTHONMALLOC`` is read only when the interpreter starts, hence the restart (``os.execv``: same pid,
    before the window or any thread exists). Does nothing off glibc Linux or when ``PYTHONMALLOC`` is already set
    (the user's choice wins, and the restarted process finds it set); a failed restart carries on as it was."""
    if not sys.platform.startswith("linux") or SYSTEM_ALLOCATOR_ENV in os.environ or not _glibc():
        return
    os.environ[SYSTEM_ALLOCATOR_ENV] = SYSTEM_ALLOCATOR
    os.environ[_CHOSEN_FOR_THE_WINDOW] = "1"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execv(sys.executable, list(sys.orig_argv))
    except OSError:  # the interpreter cannot be run again (moved, permissions): the process goes on with pymalloc
        del os.environ[SYSTEM_ALLOCATOR_ENV], os.environ[_CHOSEN_FOR_THE_WINDOW]


@contextmanager
def worker_allocator() -> Iterator[None]:
    """Around the start of a worker process (training, an export): Python's own allocator for it, as the CLI runs,
    when the window chose glibc's. A worker lives minutes, so it gains nothing from glibc's allocator and would load
    slower with it (benchmarks/load_fragmentation.py). A ``PYTHONMALLOC`` the user set is left to the worker too."""
    if os.environ.get(_CHOSEN_FOR_THE_WINDOW) != "1":
        yield
        return
    with _SPAWN_LOCK:  # one worker started at a time while the variable is out of the environment
        chosen = os.environ.pop(SYSTEM_ALLOCATOR_ENV, None)
        try:
            yield
        finally:
            if chosen is not None:
                os.environ[SYSTEM_ALLOCATOR_ENV] = chosen


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
