"""The page cache around safetensors folders: reads started ahead, pulled in with the GIL released, and a load's
mapped pages let go of once read."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_studio.core.tasks import CancelToken

_MADV_DONTNEED = 4  # sys/mman.h


def read_ahead(folder: Path) -> None:
    """Ask the kernel to start reading a folder's safetensors into the page cache, without waiting.

    Shards written with direct I/O are not in the cache; a load right after (the merge's verification)
    would fault every page in from disk inside torch's copies, which hold the GIL. Started early, the
    reads happen in the background. A no-op where ``posix_fadvise`` does not exist.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in _safetensors_files(folder):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def warm_page_cache(folder: Path, cancel: CancelToken | None = None) -> None:
    """Read a folder's safetensors into the page cache, waiting for the disk with the GIL released.

    transformers copies each tensor out of an mmap inside torch calls that hold the GIL; a page that
    is not cached then waits for the disk inside that call, and the window, which needs the GIL to
    draw, freezes for as long (measured: 200-600 ms for a cold 0.5 GB checkpoint). Reading the files
    first moves that wait here, where the system calls release the GIL. ``sendfile`` to /dev/null
    pulls the pages in without copying them out; a cached file costs next to nothing. Skipped when
    the files would not fit in the memory there is, where they could not stay cached anyway.
    """
    paths = _safetensors_files(folder)
    try:
        import psutil

        if sum(p.stat().st_size for p in paths) > psutil.virtual_memory().available // 2:
            return
        sink = os.open(os.devnull, os.O_WRONLY)
    except (ImportError, OSError):
        return
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size, offset = os.fstat(fd).st_size, 0
                while offset < size:
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    sent = os.sendfile(sink, fd, offset, min(size - offset, 64 * 1024**2))
                    if sent <= 0:
                        break
                    offset += sent
            except OSError:
                pass  # a warm-up only: the load itself reports real read errors
            finally:
                os.close(fd)
    finally:
        os.close(sink)


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
    libc = _libc() if wanted else None
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


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None
