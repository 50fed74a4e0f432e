"""gguf's ``GGUFReader._get`` slicing a plain array view of the file's mapping instead of the ``np.memmap`` itself.

``GGUFReader`` parses a file's metadata one value at a time through ``_get``, and each call slices its
``np.memmap``: numpy runs ``memmap.__getitem__`` and ``memmap.__array_finalize__`` in Python for every slice, and a
vocabulary of 262k tokens takes millions of them (Gemma 3 270M's file: 9.7 s a read, 3.7 s without that
overhead, `benchmarks/bench_gguf_read.py`).
transformers reads a GGUF base with the same reader several times over (configuration, weights, tokenizer).
:func:`fast_gguf_reads` swaps ``_get``, for the calling thread and the duration of the call, for the same
arithmetic on ``self.data.view(np.ndarray)``: the same mapped bytes, no copy; what it returns are plain views of
the mapping instead of memmaps. If ``_get`` is not the code this was written against, gguf's own is used (with a
warning).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import original_of, swapped, warn_inactive

HOOK = "GGUF metadata reading"
TARGET = "gguf.GGUFReader._get"
# what _get does, line for line, in the gguf versions this was checked against (0.17-0.19)
_EXPECTED_LINES = (
    "count = int(count)",
    "itemsize = int(np.empty([], dtype = dtype).itemsize)",
    "end_offs = offset + itemsize * count",
    "arr = self.data[offset:end_offs].view(dtype=dtype)[:count]",
    "return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))",
)
_PLAIN = "_lora_studio_plain_data"  # the reader's own attribute for its plain view


def _get(
    self: Any, offset: int, dtype: Any, count: int = 1, override_order: str | None = None
) -> Any:  # gguf's _get, on a plain view of self.data
    import numpy as np

    plain = self.__dict__.get(_PLAIN)
    if plain is None:
        plain = self.__dict__[_PLAIN] = self.data.view(np.ndarray)
    count = int(count)
    end = offset + np.dtype(dtype).itemsize * count
    arr = plain[offset:end].view(dtype=dtype)[:count]
    return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _inactive_reason() -> tuple[Any, str]:
    try:
        from gguf.gguf_reader import GGUFReader
    except ImportError as exc:
        return None, f"gguf's reader is not importable ({exc})"
    try:
        original = original_of(vars(GGUFReader)["_get"])
        source = inspect.getsource(original)
        init = inspect.getsource(GGUFReader.__init__)
    except (KeyError, OSError, TypeError):
        return None, "the source of GGUFReader._get is not readable"
    if list(inspect.signature(original).parameters) != ["self", "offset", "dtype", "count", "override_order"]:
        return None, "GGUFReader._get takes other arguments"
    lines = [line.strip() for line in source.splitlines()]
    missing = next((line for line in _EXPECTED_LINES if line not in lines), None)
    if missing is not None:
        return None, f"GGUFReader._get no longer does {missing!r}"
    if "self.data = np.memmap(" not in init:
        return None, "GGUFReader no longer maps the file with np.memmap"
    return GGUFReader, ""


def checks() -> dict[str, str]:
    return {TARGET: _inactive_reason()[1] or ACTIVE}


@contextmanager
def fast_gguf_reads() -> Iterator[None]:
    """While inside, every ``GGUFReader`` this thread makes parses the file through :func:`_get`."""
    reader_class, reason = _inactive_reason()
    if reader_class is None:
        warn_inactive(HOOK, reason)
        yield
        return
    with swapped(reader_class, "_get", _get):
        yield
