"""gguf-py's numpy quantisers for Q8_0 and BF16 replaced by ggml's own, from the llama.cpp build that checks the file.

llama.cpp's converter quantises with gguf-py's numpy port of ggml's reference quantisers (``gguf.quants.quantize``):
bit-exact, single-threaded, and most of a q8_0 export's time. :func:`ggml_quantisers` swaps in
``ggml_quantize_chunk`` of the installed llama.cpp runtime's ``libggml-base`` (the same library llama.cpp's own
quantiser and loader use), called through ctypes on row blocks spread over the cores (ctypes lets go of the GIL).
Other types, a row that does not fill whole blocks and rows holding a NaN (ggml's and gguf-py's bytes differ
there) go to gguf-py as before.

The replacement must write the very bytes gguf-py writes: before it is used, both quantise a probe array (random
rows, zero blocks, huge and tiny values, infinities and NaNs) and must agree byte for byte. When the library is
missing, a symbol is gone or the bytes differ, gguf-py's quantiser is used, with a warning once.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import swapped, warn_inactive

HOOK = "ggml quantiser"
TARGET = "gguf.quants.quantize"
FAST_TYPES = ("Q8_0", "BF16")
ROWS_PER_CALL = 256  # a block of rows per ggml call: small enough to spread a tensor over the cores


@contextmanager
def ggml_quantisers() -> Iterator[None]:
    """While inside, this thread's ``gguf.quants.quantize`` uses ggml for Q8_0 and BF16 (or gguf-py's, when the
    check fails). The converter wraps it into its lazy tensors as it queues them, so the queueing must be inside."""
    reason = _inactive_reason()
    if reason:
        warn_inactive(HOOK, reason)
        yield
        return
    import gguf.quants

    with swapped(gguf.quants, "quantize", _fast_quantize(gguf.quants.quantize)):
        yield


def quantize_rows(rows: Any, qtype: Any) -> Any:
    """``rows`` (2-D float32) quantised to ``qtype`` by ggml itself, any type llama.cpp's quantiser writes (K-quants
    included, which gguf-py cannot write): the bytes llama.cpp writes for these rows, each row on its own. Raises
    OSError when ggml's library is not loadable (the carried-adapter measure is then not made)."""
    import gguf
    import numpy as np

    chunk = _ggml_quantize_chunk()
    src = np.ascontiguousarray(rows, dtype=np.float32)
    count, width = src.shape
    out = np.empty((count, gguf.quant_shape_to_byte_shape((width,), qtype)[0]), dtype=np.uint8)
    if count:
        chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, count, width, None)
    return out


def checks() -> dict[str, str]:
    return {TARGET: _inactive_reason() or ACTIVE}


@functools.cache
def _inactive_reason() -> str:
    try:
        import gguf.quants
        import numpy as np
    except ImportError as exc:
        return f"gguf is not importable ({exc})"
    if not callable(getattr(gguf.quants, "quantize", None)):
        return "gguf.quants has no quantize"
    try:
        quantize_chunk = _ggml_quantize_chunk()
    except (OSError, AttributeError) as exc:
        return f"ggml's quantiser is not loadable ({exc})"
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((8, 256)).astype(np.float32)
    probe[1] = 0.0
    probe[2, :64] *= 1e30
    probe[3, :64] *= 1e-40
    probe[4, 0], probe[4, 33], probe[4, 70] = np.inf, -np.inf, np.nan
    probe[5] = np.float32(0.5)
    fast = _fast_quantize(gguf.quants.quantize, quantize_chunk)
    for name in FAST_TYPES:
        qtype = getattr(gguf.GGMLQuantizationType, name)
        with np.errstate(all="ignore"):
            expected = gguf.quants.quantize(probe, qtype)
            got = fast(probe, qtype)
        if got.shape != expected.shape or got.dtype != expected.dtype or got.tobytes() != expected.tobytes():
            return f"ggml's {name} bytes differ from gguf-py's"
    return ""


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """The installed llama-cpp-python's ``libggml-base`` (without importing llama_cpp); OSError when missing."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("llama-cpp-python is not installed")
    return ctypes.CDLL(str(Path(next(iter(spec.submodule_search_locations))) / "lib" / "libggml-base.so"))


@functools.cache
def _ggml_quantize_chunk() -> Callable[..., int]:
    """``ggml_quantize_chunk`` of the installed llama-cpp-python's ggml."""
    function = ggml_base().ggml_quantize_chunk
    # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64_t start, nrows, n_per_row, imatrix)
    function.restype = ctypes.c_size_t
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [ctypes.c_int, pointer, pointer, int64, int64, int64, pointer]
    return function


def _fast_quantize(original: Callable[..., Any], quantize_chunk: Callable[..., int] | None = None) -> Callable:
    import gguf
    import numpy as np
    from gguf.lazy import LazyNumpyTensor

    chunk = quantize_chunk or _ggml_quantize_chunk()
    fast = {getattr(gguf.GGMLQuantizationType, name) for name in FAST_TYPES}

    def eager(data: np.ndarray, qtype: Any) -> np.ndarray:
        rows = data.reshape(-1, data.shape[-1])
        width = rows.shape[1]
        out = np.empty((rows.shape[0], gguf.quant_shape_to_byte_shape((width,), qtype)[0]), dtype=np.uint8)

        def block(first: int) -> None:
            src = np.ascontiguousarray(rows[first : first + ROWS_PER_CALL], dtype=np.float32)
            if np.isnan(src).any():  # ggml's max skips a NaN, gguf-py's spreads it: theirs, as the converter writes
                out[first : first + src.shape[0]] = original(src, qtype)
                return
            chunk(int(qtype), src.ctypes.data, out[first].ctypes.data, 0, src.shape[0], width, None)

        starts = range(0, rows.shape[0], ROWS_PER_CALL)
        workers = min(len(starts), os.cpu_count() or 1)
        if workers <= 1:
            for first in starts:
                block(first)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="ggml-quantize") as pool:
                for _ in pool.map(block, starts):
                    pass
        return out.reshape(gguf.quant_shape_to_byte_shape(data.shape, qtype))

    def quantize(data: Any, qtype: Any) -> Any:
        if qtype not in fast or not data.shape or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            return original(data, qtype)  # gguf-py's, with its QuantError for rows that do not fill blocks
        if isinstance(data, LazyNumpyTensor):
            shape = functools.partial(gguf.quant_shape_to_byte_shape, quant_type=qtype)
            return LazyNumpyTensor._wrap_fn(functools.partial(eager, qtype=qtype), meta_noop=(np.uint8, shape))(data)
        return eager(np.asarray(data), qtype)

    return quantize
