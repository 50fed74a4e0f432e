"""Writing safetensors shards as a stream: one tensor at a time, the header laid out up front from known shapes.

:class:`ShardWriter` writes one file in a declared order (tensors, or :class:`FileSlice` bytes
copied file to file), optionally past the page cache with direct I/O; :func:`write_state_dict`
splits a plan into shards, writes them (on a background thread if asked) and the index.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.core.errors import UserError
from lora_studio.core.io.safetensors_format import DTYPE_SIZES, INDEX_NAME, SINGLE_NAME, FileSlice, st_dtype

if TYPE_CHECKING:
    import torch
    from typing_extensions import Buffer

    # what a tensor stream yields: a name and its tensor (or a slice of a file to copy)
    NamedTensor = tuple[str, torch.Tensor | FileSlice]


_WRITEBACK: Any = None  # None: not looked up yet; False: unavailable; else libc's sync_file_range


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting (Linux ``sync_file_range``).

    Without it the dirty pages of a fresh shard sit in memory until the closing fsync, which then
    writes the whole shard while nothing else happens; started early, the disk writes overlap the
    merge arithmetic and the closing fsync has little left to do. Elsewhere: a no-op.
    """
    global _WRITEBACK
    if _WRITEBACK is None:
        _WRITEBACK = False
        try:
            import ctypes
            import ctypes.util
            import sys

            if sys.platform.startswith("linux"):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _WRITEBACK = fn
        except (OSError, AttributeError):
            _WRITEBACK = False
    if _WRITEBACK and nbytes > 0:
        _WRITEBACK(
            fd, offset, nbytes, 2
        )  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait; errors surface at fsync


def _write_all(fd: int, data: Buffer) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def _copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int, name: str, path: Path) -> None:
    """Append ``nbytes`` of ``src_fd`` from ``offset`` to ``dst_fd`` (at its position), file to file."""
    done = 0
    fast = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = min(nbytes - done, 1 << 30)
        got = -1
        if fast:
            try:
                got = os.copy_file_range(src_fd, dst_fd, n, offset + done)
            except OSError as exc:
                if exc.errno not in (18, 22, 38, 95, 1):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP, EPERM: not here
                    raise
                fast = False
                continue
        else:
            block = os.pread(src_fd, min(n, 16 * 1024**2), offset + done)
            got = _write_all(dst_fd, block) if block else 0
        if got <= 0:
            raise UserError(f"{Path(path).name} ended early while reading {name}", "the file is truncated")
        done += got


class _DirectAppender:
    """Appends bytes to a file opened with ``O_DIRECT``, through one page-aligned staging buffer.

    Direct writes go from this buffer to the disk without a copy into the page cache. Measured on
    the merge benchmark, that kernel copy (into freshly allocated cache pages) cost as much CPU as the
    whole merge arithmetic; without it the writer thread barely competes with the merge for the cores.
    ``O_DIRECT`` needs aligned offsets, lengths and memory: the buffer is an anonymous mmap
    (page-aligned), every write but the last is a whole buffer, and the last is padded to the
    alignment and the file truncated back to its real length.
    """

    ALIGN = 4096
    CHUNK = 8 * 1024**2

    def __init__(self, fd: int) -> None:
        import mmap

        self.fd = fd
        self._map = mmap.mmap(-1, self.CHUNK)
        self._view = memoryview(self._map)
        self._fill = 0
        self._offset = 0  # file offset of the buffer's first byte

    @property
    def size(self) -> int:
        return self._offset + self._fill

    def append(self, data: Buffer) -> int:
        data = memoryview(data).cast("B")
        total = len(data)
        while len(data):
            n = min(len(data), self.CHUNK - self._fill)
            self._view[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == self.CHUNK:
                self._flush(self.CHUNK)
        return total

    def append_from_file(self, src_fd: int, offset: int, nbytes: int, name: str, path: Path) -> None:
        """Read ``nbytes`` of ``src_fd`` straight into the staging buffer (no intermediate copy)."""
        done = 0
        while done < nbytes:
            n = min(nbytes - done, self.CHUNK - self._fill)
            got = os.preadv(src_fd, [self._view[self._fill : self._fill + n]], offset + done)
            if got <= 0:
                raise UserError(f"{Path(path).name} ended early while reading {name}", "the file is truncated")
            self._fill += got
            done += got
            if self._fill == self.CHUNK:
                self._flush(self.CHUNK)

    def finish(self) -> None:
        """Write what is left (padded to the alignment) and cut the file to its real length."""
        size = self.size
        if self._fill:
            padded = -(-self._fill // self.ALIGN) * self.ALIGN
            self._view[self._fill : padded] = bytes(padded - self._fill)
            self._flush(padded)
            os.ftruncate(self.fd, size)
        self._offset, self._fill = size, 0

    def close(self) -> None:
        try:
            self._view.release()
            self._map.close()
        except BufferError:  # a failed write's traceback still holds a slice: the map goes with it
            pass

    def _flush(self, nbytes: int) -> None:
        _pwrite_all(self.fd, self._view[:nbytes], self._offset)
        self._offset += self._fill
        self._fill = 0


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            if exc.errno != 22 or not _drop_direct(fd):  # EINVAL: this filesystem refuses O_DIRECT writes
                raise


def _drop_direct(fd: int) -> bool:
    """Turn ``O_DIRECT`` off on an open file (Linux allows it with F_SETFL); False when it was not on."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & getattr(os, "O_DIRECT", 0):
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    return True


def _open_for_writing(path: Path, direct: bool) -> tuple[int, bool]:
    """A new file for a shard; with ``direct``, ``O_DIRECT`` where the platform and filesystem take it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    direct_flag = getattr(os, "O_DIRECT", 0) if direct else 0
    if direct_flag:
        try:
            return os.open(path, flags | direct_flag, 0o666), True
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: no direct I/O here (tmpfs on older kernels, some FUSE filesystems)
                raise
    return os.open(path, flags, 0o666), False


class ShardWriter:
    """Writes one safetensors file tensor by tensor in a declared order.

    ``plan`` gives name -> (safetensors dtype, shape) in the order tensors will be
    written; the header is written first, then each :meth:`write` appends bytes (a
    tensor, or a :class:`FileSlice` copied file to file). With ``direct`` (and on Linux)
    the file is written with direct I/O (:class:`_DirectAppender`); otherwise through the
    page cache, with writeback started after each tensor so the closing fsync does not write
    the whole shard at once. Direct I/O saves the CPU of copying into the cache, but leaves
    nothing cached for whoever reads the file next.
    """

    def __init__(
        self,
        path: Path,
        plan: Mapping[str, tuple[str, tuple[int, ...]]],
        metadata: dict | None = None,
        direct: bool = False,
    ) -> None:
        self.path = Path(path)
        self._order = list(plan)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, (dtype, shape) in plan.items():
            n = DTYPE_SIZES[dtype]
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes
        self._plan = {k: (v[0], tuple(v[1])) for k, v in plan.items()}
        self._next = 0
        self.nbytes = 8 + len(raw) + offset
        self._fd: int | None
        self._fd, direct = _open_for_writing(self.path, direct)
        self._direct = _DirectAppender(self._fd) if direct else None
        self._src: dict[Path, int] = {}
        self._pos = 0
        self._flushed = 0  # bytes handed to writeback so far (page-cache writes only)
        try:
            self._pos += self._append(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> int:
        """Append the next planned tensor (its bytes, or a file slice copied file to file); returns bytes written."""
        expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"ShardWriter: expected {expected}, got {name}")
        dtype, shape = self._plan[name]
        if isinstance(tensor, FileSlice):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise RuntimeError(
                    f"ShardWriter: {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}"
                )
            src = self._src.get(tensor.path)
            if src is None:
                src = self._src[tensor.path] = os.open(tensor.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if self._direct is not None:
                self._direct.append_from_file(src, tensor.offset, tensor.nbytes, name, tensor.path)
            else:
                _copy_range(src, self._open_fd(), tensor.offset, tensor.nbytes, name, tensor.path)
            n = tensor.nbytes
        else:
            if tuple(tensor.shape) != shape or st_dtype(tensor.dtype) != dtype:
                raise RuntimeError(
                    f"ShardWriter: {name} is {st_dtype(tensor.dtype)}{tuple(tensor.shape)}, planned {dtype}{shape}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
            # numpy's stubs give ndarray the buffer protocol (__buffer__) only for Python >= 3.12
            n = self._append(data) if data.nbytes else 0  # type: ignore[arg-type]
        self._pos += n
        self._next += 1
        if self._direct is None and self._pos - self._flushed >= 8 * 1024**2:
            _start_writeback(self._open_fd(), self._flushed, self._pos - self._flushed)
            self._flushed = self._pos
        return n

    def _append(self, data: Buffer) -> int:
        if self._direct is not None:
            return self._direct.append(data)
        return _write_all(self._open_fd(), data)

    def _open_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"ShardWriter: {self.path.name} is closed")
        return self._fd

    def close(self) -> None:
        if self._fd is None:
            return
        complete = self._next == len(self._order)
        try:
            if self._direct is not None:
                self._direct.finish()
            os.fsync(self._fd)  # direct writes skip the cache, but the file's size and blocks are metadata
        finally:
            self._close_fds()
        if not complete:
            raise RuntimeError(f"ShardWriter: {self.path.name} closed after {self._next}/{len(self._order)} tensors")

    def abort(self) -> None:
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._src.values():
            os.close(fd)
        self._src.clear()
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def plan_shards(plan: Mapping[str, tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[dict]:
    """Split an ordered tensor plan into shards of at most ``max_shard_bytes`` (a lone big tensor gets its own)."""
    shards: list[dict] = [{}]
    size = 0
    for name, (dtype, shape) in plan.items():
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dtype, tuple(shape))
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(folder: Path, shards: list[dict], names: list[str], total_size: int) -> None:
    if len(shards) == 1:
        return
    weight_map = {t: names[i] for i, shard in enumerate(shards) for t in shard}
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_NAME).write_text(json.dumps(doc, indent=2) + "\n", "utf-8")


def write_state_dict(
    folder: Path,
    tensors: Iterator[tuple[str, torch.Tensor | FileSlice]],
    plan: Mapping[str, tuple[str, tuple[int, ...]]],
    *,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    background: bool = False,
    direct: bool = False,
) -> list[Path]:
    """Write tensors (yielded in ``plan`` order) as safetensors shards plus an index.

    Tensors are consumed one at a time, so peak memory is one tensor whatever the model size.

    ``background``: a second thread writes each tensor while the iterator produces the next one
    (file writes release the GIL, and so does torch's arithmetic). The iterator must leave a
    yielded tensor untouched until the next-but-one is requested: at most two are alive, the
    one being written and the one being computed (``stream_merged_tensors(..., ring=2)``).
    ``on_tensor`` is still called on this thread, in order.
    ``direct``: write past the page cache (see :class:`ShardWriter`).
    """
    shards = plan_shards(plan, max_shard_bytes)
    names = shard_names(len(shards))
    meta = {"format": "pt", **(metadata or {})}
    it = iter(tensors)
    if background:
        paths, total = _write_shards_in_background(folder, shards, names, meta, it, on_tensor, direct)
    else:
        paths, total = [], 0
        for shard, name in zip(shards, names, strict=True):
            writer = ShardWriter(Path(folder) / name, shard, meta, direct)
            try:
                for expected in shard:
                    got_name, tensor = _next_in_order(it, expected)
                    n = writer.write(got_name, tensor)
                    total += n
                    del tensor
                    if on_tensor is not None:
                        on_tensor(got_name, n)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            paths.append(writer.path)
    write_index(folder, shards, names, total)
    return paths


def _next_in_order(it: Iterator[NamedTensor], expected: str) -> NamedTensor:
    try:
        got_name, tensor = next(it)
    except StopIteration:
        raise RuntimeError(f"tensor stream ended before {expected}") from None
    if got_name != expected:
        raise RuntimeError(f"tensor stream out of order: {got_name} before {expected}")
    return got_name, tensor


class _WriterStopped(Exception):
    pass


def _write_shards_in_background(
    folder: Path,
    shards: list[dict[str, tuple[str, tuple[int, ...]]]],
    names: list[str],
    meta: dict,
    it: Iterator[NamedTensor],
    on_tensor: Callable[[str, int], None] | None,
    direct: bool,
) -> tuple[list[Path], int]:
    import queue
    import threading

    todo: queue.Queue[NamedTensor | None] = queue.Queue()  # (name, tensor), or None: stop
    # (name, nbytes) per tensor written, then ("", None); or an exception
    written: queue.Queue[tuple[str, int | None] | BaseException] = queue.Queue()
    paths: list[Path] = []

    def run() -> None:
        try:
            for shard, name in zip(shards, names, strict=True):
                writer = ShardWriter(Path(folder) / name, shard, meta, direct)
                try:
                    for _ in shard:
                        item = todo.get()
                        if item is None:
                            raise _WriterStopped()
                        n = writer.write(item[0], item[1])
                        written.put((item[0], n))
                        del item
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                paths.append(writer.path)
            written.put(("", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the producing thread
            written.put(exc)

    thread = threading.Thread(target=run, name="lora-studio-shard-writer", daemon=True)
    thread.start()
    total = produced = done = 0

    def take() -> None:
        nonlocal total, done
        item = written.get()
        if isinstance(item, BaseException):
            raise item
        name, n = item
        if n is None:
            return
        total += n
        done += 1
        if on_tensor is not None:
            on_tensor(name, n)

    try:
        for shard in shards:
            for expected in shard:
                while done < produced - 1:  # the iterator is about to reuse the buffer of the tensor two back
                    take()
                todo.put(_next_in_order(it, expected))
                produced += 1
        while done < produced:
            take()
        take()  # the writer's end: every shard closed and fsynced
    except BaseException:
        todo.put(None)
        thread.join()
        raise
    thread.join()
    return paths, total
