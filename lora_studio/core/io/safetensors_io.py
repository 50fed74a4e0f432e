"""Reading safetensors headers and tensors one at a time, and writing shards as a stream.

The safetensors format is an 8-byte little-endian header length, a JSON header
mapping each tensor name to its dtype, shape and byte range, then the raw bytes.
Reading the header alone gives parameter counts and shapes without loading
anything; reading one tensor with ``pread`` keeps memory at one tensor (an mmap
would count every touched page of a shard in the process RSS). The writer lays
out the header up front from known shapes, so tensors can be produced and written
one by one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from lora_studio.core.errors import UserError

# safetensors dtype names -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the data
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; a broken file gives a UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a safetensors file", "point at the .safetensors file or its parent folder")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path.name} is not a safetensors file (only {len(head)} bytes)", "the file is truncated or empty; download it again")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(f"{path.name} has a corrupt safetensors header (header length {n}, file {size} bytes)", "the file is damaged; download or save it again")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", "check that the file exists and is readable") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path.name} has a corrupt safetensors header ({exc})", "the file is damaged; download or save it again") from exc
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    metadata = doc.pop("__metadata__", None) or {}
    for name, entry in doc.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path.name}: tensor {name!r} has a malformed header entry", "the file is damaged") from exc
        info = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        expected = info.numel * DTYPE_SIZES.get(dtype, 0)
        if dtype in DTYPE_SIZES and expected != info.nbytes:
            raise UserError(f"{path.name}: tensor {name!r} has {info.nbytes} bytes, its shape needs {expected}", "the file is damaged")
        if info.end > size:
            raise UserError(
                f"{path.name} is truncated: tensor {name!r} ends at byte {info.end} but the file has {size}",
                "the download or save did not finish; get the file again",
            )
        tensors[name] = info
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, following its index when there is one."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index", "the model folder is damaged") from exc
        files = []
        for name in dict.fromkeys(weight_map.values()):
            shard = folder / name
            if not shard.is_file():
                raise UserError(f"{folder.name}: the index names shard {name} but it is missing", "the download did not finish; get the missing shard")
            files.append(shard)
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise UserError(f"{folder} holds no .safetensors weights", "LoRA Studio loads safetensors checkpoints; convert .bin weights first")


def read_headers(folder: Path) -> list[SafetensorsHeader]:
    return [read_header(p) for p in checkpoint_files(folder)]


def torch_dtype(st_dtype: str):
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }[st_dtype]


def st_dtype(dtype) -> str:
    import torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }[dtype]


def pread_exact(fd: int, buffer, info: TensorInfo, path: Path) -> None:
    """Fill ``buffer`` (anything with the buffer protocol, ``info.nbytes`` long) with the tensor's bytes."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < info.nbytes:
        got = os.preadv(fd, [view[done:]], info.begin + done)
        if got <= 0:
            raise UserError(f"{Path(path).name} ended early while reading {info.name}", "the file is truncated")
        done += got


def read_tensor(info: TensorInfo, path: Path, fd: Optional[int] = None):
    """Read one tensor with pread: memory is that tensor, not the shard's pages."""
    import torch

    buf = bytearray(info.nbytes)
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        pread_exact(fd, buf, info, path)
    finally:
        if own:
            os.close(fd)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)


@dataclass(frozen=True)
class FileSlice:
    """A tensor's bytes left in a source file, written to the output by a file-to-file copy.

    A writer copies them with ``os.copy_file_range`` (inside the kernel, no buffer in this
    process) instead of reading them into memory first; used for tensors a merge leaves as they are.
    """

    path: Path
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]
    offset: int
    nbytes: int


_WRITEBACK = None


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
        _WRITEBACK(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait; errors surface at fsync


def _write_all(fd: int, data) -> int:
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

    def append(self, data) -> int:
        data = memoryview(data).cast("B")
        total = len(data)
        while len(data):
            n = min(len(data), self.CHUNK - self._fill)
            self._view[self._fill:self._fill + n] = data[:n]
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
            got = os.preadv(src_fd, [self._view[self._fill:self._fill + n]], offset + done)
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
            self._view[self._fill:padded] = bytes(padded - self._fill)
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


def _pwrite_all(fd: int, data, offset: int) -> None:
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
    direct = getattr(os, "O_DIRECT", 0) if direct else 0
    if direct:
        try:
            return os.open(path, flags | direct, 0o666), True
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

    def __init__(self, path: Path, plan: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Optional[dict] = None,
                 direct: bool = False):
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
        self._fd: Optional[int]
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

    def write(self, name: str, tensor) -> int:
        expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"ShardWriter: expected {expected}, got {name}")
        dtype, shape = self._plan[name]
        if isinstance(tensor, FileSlice):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise RuntimeError(f"ShardWriter: {name} is {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
            src = self._src.get(tensor.path)
            if src is None:
                src = self._src[tensor.path] = os.open(tensor.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if self._direct is not None:
                self._direct.append_from_file(src, tensor.offset, tensor.nbytes, name, tensor.path)
            else:
                _copy_range(src, self._fd, tensor.offset, tensor.nbytes, name, tensor.path)
            n = tensor.nbytes
        else:
            if tuple(tensor.shape) != shape or st_dtype(tensor.dtype) != dtype:
                raise RuntimeError(f"ShardWriter: {name} is {st_dtype(tensor.dtype)}{tuple(tensor.shape)}, planned {dtype}{shape}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
            n = self._append(data) if data.nbytes else 0
        self._pos += n
        self._next += 1
        if self._direct is None and self._pos - self._flushed >= 8 * 1024**2:
            _start_writeback(self._fd, self._flushed, self._pos - self._flushed)
            self._flushed = self._pos
        return n

    def _append(self, data) -> int:
        if self._direct is not None:
            return self._direct.append(data)
        return _write_all(self._fd, data)

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


def warm_page_cache(folder: Path, cancel=None) -> None:
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


def write_state_dict(folder: Path, tensors: Iterator[tuple[str, object]], plan: Mapping[str, tuple[str, tuple[int, ...]]],
                     *, max_shard_bytes: int = 2 * 1024**3, metadata: Optional[dict] = None,
                     on_tensor=None, background: bool = False, direct: bool = False) -> list[Path]:
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
        for shard, name in zip(shards, names):
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


def _next_in_order(it, expected: str):
    try:
        got_name, tensor = next(it)
    except StopIteration:
        raise RuntimeError(f"tensor stream ended before {expected}") from None
    if got_name != expected:
        raise RuntimeError(f"tensor stream out of order: {got_name} before {expected}")
    return got_name, tensor


class _WriterStopped(Exception):
    pass


def _write_shards_in_background(folder: Path, shards: list[dict], names: list[str], meta: dict, it, on_tensor, direct: bool):
    import queue
    import threading

    todo: queue.Queue = queue.Queue()  # (name, tensor), or None: stop
    written: queue.Queue = queue.Queue()  # (name, nbytes) per tensor written, then ("", paths); or an exception
    paths: list[Path] = []

    def run() -> None:
        try:
            for shard, name in zip(shards, names):
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


@contextmanager
def atomic_output_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one step.

    On any error or cancellation the temporary folder is removed and ``target`` is
    left exactly as it was. An existing ``target`` is replaced only with ``overwrite``,
    and then by an atomic exchange (Linux ``renameat2``), so a crash at any moment
    leaves either the old folder or the complete new one at ``target``. Temporary
    folders of runs that were killed are removed on the next run.
    """
    target = Path(target).absolute()
    parent = target.parent
    if parent.is_dir():
        _remove_stale_temporaries(parent, target.name)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists", "choose another output folder, or confirm overwriting it (--overwrite)")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder", "choose another output path")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {parent}: {exc.strerror or exc}", "choose a writable location") from exc
    tmp = parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write in {parent}: {exc.strerror or exc}", "choose a writable output folder") from exc
    try:
        yield tmp
        _fsync_dir(tmp)
        if target.exists():
            if _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:  # no renameat2: two renames, old folder kept aside until the new one is in place
                old = parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
            raise UserError(f"the disk holding {parent} is full", "free some space or choose another output folder; nothing was written") from exc
        if isinstance(exc, OSError) and exc.errno in (13, 30):  # EACCES, EROFS
            raise UserError(f"cannot write to {parent}: {exc.strerror}", "choose a writable output folder; nothing was written") from exc
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem or kernel without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete temporary folders left by runs that were killed (their process is gone)."""
    for prefix in (f".{name}.partial-", f".{name}.old-"):
        for path in parent.glob(prefix + "*"):
            try:
                pid = int(path.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                if prefix.endswith(".old-") and not (parent / name).exists():
                    os.rename(path, parent / name)  # killed between two renames: put the old folder back
                else:
                    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
