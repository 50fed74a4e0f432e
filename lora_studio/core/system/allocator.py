"""glibc's allocator, set for a long session."""

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
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, count))
    except (OSError, AttributeError):  # not glibc
        return False
