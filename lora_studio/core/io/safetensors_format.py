"""The safetensors format: headers parsed and checked, tensors read one at a time with ``pread``.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw bytes. Reading the header
alone gives parameter counts and shapes without loading anything; reading one tensor with
``pread`` keeps memory at one tensor (an mmap would count every touched page of a shard in
the process RSS). Writing lives in :mod:`lora_studio.core.io.shard_writer`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.errors import UserError
from lora_studio.core.io.paths import inside, regular_file

if TYPE_CHECKING:
    import torch
    from typing_extensions import Buffer

# safetensors dtype names -> bytes per element
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
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
        raise UserError(
            f"{path} is a folder, not a safetensors file", "point at the .safetensors file or its parent folder"
        )
    regular_file(path, "weights file")  # a FIFO would block the open below forever
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(
                    f"{path.name} is not a safetensors file (only {len(head)} bytes)",
                    "the file is truncated or empty; download it again",
                )
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(
                    f"{path.name} has a corrupt safetensors header (header length {n}, file {size} bytes)",
                    "the file is damaged; download or save it again",
                )
            raw = f.read(n)
    except OSError as exc:
        raise UserError(
            f"cannot read {path}: {exc.strerror or exc}", "check that the file exists and is readable"
        ) from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(
            f"{path.name} has a corrupt safetensors header "
            f"({'nested too deeply' if isinstance(exc, RecursionError) else exc})",
            "the file is damaged; download or save it again",
        ) from exc
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UserError(
            f"{path.name} has a corrupt safetensors header (__metadata__ is not an object)", "the file is damaged"
        )
    for name, entry in doc.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{path.name}: tensor {name!r} has a malformed header entry", "the file is damaged"
            ) from exc
        info = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        expected = info.numel * DTYPE_SIZES.get(dtype, 0)
        if dtype in DTYPE_SIZES and expected != info.nbytes:
            raise UserError(
                f"{path.name}: tensor {name!r} has {info.nbytes} bytes, its shape needs {expected}",
                "the file is damaged",
            )
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
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise UserError(f"{index} is not a valid safetensors index", "the model folder is damaged") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} is not a valid safetensors index", "the model folder is damaged")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            shard = inside(folder, name, "shard named by the index")
            if not shard.is_file():
                raise UserError(
                    f"{folder.name}: the index names shard {name} but it is missing",
                    "the download did not finish; get the missing shard",
                )
            files.append(regular_file(shard, "weights shard"))
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return [regular_file(inside(folder, SINGLE_NAME, "weights file"), "weights file")]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return [regular_file(inside(folder, p.name, "weights file"), "weights file") for p in found]
    raise UserError(
        f"{folder} holds no .safetensors weights",
        "LoRA Studio loads safetensors checkpoints; convert .bin weights first",
    )


def read_headers(folder: Path) -> list[SafetensorsHeader]:
    return [read_header(p) for p in checkpoint_files(folder)]


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }[st_dtype]


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    import torch

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }[dtype]


def pread_exact(fd: int, buffer: Buffer, info: TensorInfo, path: Path) -> None:
    """Fill ``buffer`` (anything with the buffer protocol, ``info.nbytes`` long) with the tensor's bytes."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < info.nbytes:
        got = os.preadv(fd, [view[done:]], info.begin + done)
        if got <= 0:
            raise UserError(f"{Path(path).name} ended early while reading {info.name}", "the file is truncated")
        done += got


def read_tensor(info: TensorInfo, path: Path, fd: int | None = None) -> torch.Tensor:
    """Read one tensor with pread: memory is that tensor, not the shard's pages."""
    import torch

    buf = bytearray(info.nbytes)
    handle = os.open(path, os.O_RDONLY) if fd is None else fd
    try:
        pread_exact(handle, buf, info, path)
    finally:
        if fd is None:
            os.close(handle)
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
