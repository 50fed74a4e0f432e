"""gguf's ``GGUFWriter.write_tensor_data`` fed one row piece at a time.

The writer takes a tensor's data as one array; for an embedding quantised to q8_0 that is a second
copy of the tensor in memory. :func:`write_tensor_pieces` does what ``write_tensor_data`` does
(pad the file to the alignment, write the bytes, pad after them, drop the tensor's info from the
writer's queue) but writes the pieces as they come. It relies on the writer's ``fout``, ``tensors``,
``state`` and ``write_padding``; when those are not what it expects, the pieces are joined and handed
to ``write_tensor_data`` (the plain path: same file, more memory), with a warning once.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import warn_inactive

HOOK = "GGUF piecewise tensor writer"
TARGET = "gguf.GGUFWriter.write_tensor_data"


def _inactive_reason(writer: Any | None = None) -> str:
    try:
        import gguf
    except ImportError as exc:
        return f"gguf is not importable ({exc})"
    cls = gguf.GGUFWriter
    for name in ("write_padding", "write_tensor_data"):
        if not callable(getattr(cls, name, None)):
            return f"GGUFWriter has no {name}"
    try:
        source = inspect.getsource(cls.write_tensor_data)
    except (OSError, TypeError):
        return "the source of GGUFWriter.write_tensor_data is not readable"
    for expected in ("self.fout", "self.tensors", "write_padding", "WriterState.WEIGHTS"):
        if expected not in source:
            return f"GGUFWriter.write_tensor_data no longer uses {expected}"
    if writer is not None and (len(getattr(writer, "fout", None) or []) != 1 or len(writer.tensors) != 1):
        return "the writer splits its output into several files"
    return ""


def checks() -> dict[str, str]:
    return {TARGET: _inactive_reason() or ACTIVE}


def write_tensor_pieces(writer: Any, pieces: Iterable[Any], nbytes: int) -> None:
    """Write the next tensor of ``writer`` (its ``nbytes`` planned) from numpy ``pieces``, in order."""
    import gguf
    import numpy as np

    reason = _inactive_reason(writer)
    if reason:
        warn_inactive(HOOK, reason)
        writer.write_tensor_data(np.concatenate([np.asarray(p).reshape(-1).view(np.uint8) for p in pieces]))
        return
    if writer.state not in (gguf.WriterState.TI_DATA, gguf.WriterState.WEIGHTS):
        raise ValueError(f"expected the tensor infos written, got {writer.state}")
    fout = writer.fout[0]
    queue = writer.tensors[0]
    name = next(iter(queue))
    if queue[name].nbytes != nbytes:
        raise ValueError(f"{name}: {nbytes} bytes given, {queue[name].nbytes} planned")
    writer.write_padding(fout, fout.tell())
    written = 0
    for piece in pieces:
        piece.tofile(fout)
        written += piece.nbytes
    if written != nbytes:
        raise ValueError(f"{name}: {written} bytes written, {nbytes} planned")
    writer.write_padding(fout, nbytes)
    del queue[name]
    writer.state = gguf.WriterState.WEIGHTS
