"""The page cache around safetensors folders: reads started ahead, or pulled in with the GIL released."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_studio.core.tasks import CancelToken


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
