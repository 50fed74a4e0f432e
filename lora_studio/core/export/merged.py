"""Merged GGUF, streamed: base shards in, one GGUF out, one tensor in memory at a time.

The merge is the streaming merge's own (core/merge/streaming.py: the same bits as PEFT's
``merge_and_unload``, in the base's dtype); each merged tensor is then converted exactly as
llama.cpp's ``convert_hf_to_gguf.py`` converts a saved folder (float32 unless float16, the
Llama q/k permutation, norms/biases/1-D tensors kept in float32, gguf's quantiser, F16 where
a row does not fill quantisation blocks) and written straight into the GGUF. So the file holds
the tensors the usual "merge, save, convert" recipe gives, without the merged copy in memory
or on disk. The header (every tensor's name, type and size) is written first, from the
checkpoint headers alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio import __version__
from lora_studio.core._compat.gguf_pieces import write_tensor_pieces
from lora_studio.core.errors import UserError
from lora_studio.core.export.architecture import Architecture, add_hyperparameters, extra_tensors, permute_rows
from lora_studio.core.export.gguf_types import ggml_type, llama_file_type
from lora_studio.core.export.vocab import VocabSummary, add_vocab
from lora_studio.core.merge.streaming import StreamPlan, load_streaming_adapter, stream_merged_tensors
from lora_studio.core.model.config import tied_embeddings
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerBase

    from lora_studio.core.io.safetensors_format import FileSlice

WRITING_STAGE = "writing GGUF tensor"
QUANTISE_ROWS = 256  # rows per quantisation piece (its float32 temporaries: a few MB)


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str | None  # None for a tensor llama.cpp needs that the checkpoint lacks (rope_freqs)
    name: str
    shape: tuple[int, ...]  # torch order
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: int | None


def tensor_type(name: str, shape: tuple[int, ...], wanted: Any) -> Any:
    """The type llama.cpp's converter gives this tensor when the file type is ``wanted``."""
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return f32
    if wanted in (f32, gguf.GGMLQuantizationType.F16):
        return wanted
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16  # the converter's fallback when a row does not fill the blocks
    return wanted


def tensor_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def plan_tensors(arch: Architecture, stream: StreamPlan, type_name: str) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in file order, from the checkpoint headers."""
    wanted = ggml_type(type_name)
    planned = []
    for extra_name, data in extra_tensors(arch):
        shape = tuple(data.shape)
        qtype = tensor_type(extra_name, shape, wanted)
        planned.append(PlannedTensor(None, extra_name, shape, qtype, tensor_nbytes(shape, qtype), None))
    for hf_name, (_, info) in stream.sources.items():
        name = arch.gguf_name_of(hf_name)
        if name is None:
            continue
        qtype = tensor_type(name, info.shape, wanted)
        planned.append(
            PlannedTensor(hf_name, name, info.shape, qtype, tensor_nbytes(info.shape, qtype), arch.permutation(hf_name))
        )
    return planned


def quantise_rows(rows: np.ndarray, qtype: Any) -> np.ndarray:
    """gguf's quantiser on a block of rows in one call: ``gguf.quants.quantize`` cuts its input into groups of 16
    rows, and for a 2048-wide tensor that is ~15 small numpy calls per 32k values, which holds the GIL most of the
    time; whole blocks of rows give the same bytes (every quantisation block lies in one row) in long numpy loops."""
    import gguf
    import numpy as np

    kind = getattr(gguf.quants, qtype.name, None)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) or kind is None:
        return gguf.quants.quantize(rows, qtype)
    if not kind.can_quantize(rows):
        raise gguf.QuantError(f"{qtype.name} cannot quantise rows of {rows.shape[-1]}")
    return kind.quantize_rows(np.ascontiguousarray(rows))


def quantise(data: np.ndarray, qtype: Any, threads: int = 1) -> np.ndarray:
    """gguf's quantiser on row pieces (rows quantise independently: the same bytes as one call), so its float32
    temporaries stay a few MB whatever the tensor; on ``threads`` threads for a big tensor."""
    import gguf
    import numpy as np

    if data.ndim != 2:
        return gguf.quants.quantize(data, qtype)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return np.concatenate(list(_quantised_pieces(data, qtype, pool)), axis=0)


def _quantised_pieces(rows: np.ndarray, qtype: Any, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """``rows`` quantised ``QUANTISE_ROWS`` rows at a time on ``pool``, in order."""
    return pool.map(lambda i: quantise_rows(rows[i : i + QUANTISE_ROWS], qtype), range(0, rows.shape[0], QUANTISE_ROWS))


def converted_pieces(source: Any, planned: PlannedTensor, threads: int = 1) -> Iterator[np.ndarray]:
    """One merged checkpoint tensor (a torch tensor, or a FileSlice of one the merge leaves as it is) as
    llama.cpp's converter writes it: float32 unless float16, permuted, quantised. Yielded as row pieces,
    converted a block of rows at a time, so the tensor is never whole in float32 nor whole once converted."""
    import gguf

    from lora_studio.core.io.safetensors_format import FileSlice

    if isinstance(source, FileSlice):
        if planned.permute_heads is None and len(source.shape) >= 2:
            yield from _slice_pieces(source, planned, threads)
            return
        source = _read_rows(source, 0, source.shape[0])  # a q/k projection or a 1-D tensor: small
    tensor = source
    if planned.permute_heads is not None:
        tensor = permute_rows(tensor, planned.permute_heads)  # a reordering of rows: any dtype, the same bits
    if tensor.ndim < 2:
        yield gguf.quants.quantize(_float(tensor).numpy(), planned.qtype)
        return
    yield from _row_pieces(tensor, planned.qtype, threads)


def _float(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return tensor if tensor.dtype in (torch.float16, torch.float32) else tensor.to(torch.float32)


def _block_rows(threads: int) -> int:
    return QUANTISE_ROWS * max(1, threads) * 4  # rows converted to float32 at once: a few pieces per thread


def _row_pieces(tensor: torch.Tensor, qtype: Any, threads: int) -> Iterator[np.ndarray]:
    step = _block_rows(threads)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i in range(0, tensor.shape[0], step):
            yield from _quantised_pieces(_float(tensor[i : i + step]).numpy(), qtype, pool)


def _slice_pieces(source: FileSlice, planned: PlannedTensor, threads: int) -> Iterator[np.ndarray]:
    """An untouched tensor read from its shard a block of rows at a time (no whole copy in memory)."""
    rows = source.shape[0]
    step = _block_rows(threads)
    for i in range(0, rows, step):
        yield from _row_pieces(_read_rows(source, i, min(step, rows - i)), planned.qtype, threads)


def _read_rows(source: FileSlice, start: int, count: int) -> torch.Tensor:
    """Rows ``start`` .. ``start + count`` of a FileSlice, read with the checkpoint reader's ``pread_exact``."""
    import torch

    from lora_studio.core.io.safetensors_format import TensorInfo, pread_exact, torch_dtype

    row_bytes = source.nbytes // max(1, source.shape[0])
    begin = source.offset + start * row_bytes
    rows = TensorInfo(
        f"rows {start}..{start + count}", source.dtype, (count, *source.shape[1:]), begin, begin + count * row_bytes
    )
    buffer = bytearray(rows.nbytes)
    fd = os.open(source.path, os.O_RDONLY)
    try:
        pread_exact(fd, buffer, rows, source.path)
    finally:
        os.close(fd)
    return torch.frombuffer(buffer, dtype=torch_dtype(source.dtype)).view(rows.shape)


def add_general(writer: gguf.GGUFWriter, arch: Architecture, name: str, type_name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_string("general.quantized_by", f"LoRA Studio {__version__}")
    add_hyperparameters(writer, arch)
    writer.add_file_type(llama_file_type(type_name))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_merged_gguf(
    out: Path,
    arch: Architecture,
    stream: StreamPlan,
    dtype: str,
    base_folder: Path,
    adapter_folder: Path | None,
    tokenizer: PreTrainedTokenizerBase,
    type_name: str,
    model_name: str,
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> VocabSummary:
    """Write the GGUF of ``base_folder`` (+ the adapter merged in, in ``dtype``: the one ``stream`` was planned
    for) to ``out``, tensor by tensor."""
    import gguf

    cancel = cancel or CancelToken()
    adapter = None
    if adapter_folder is not None:
        adapter = load_streaming_adapter(
            adapter_folder, stream.sources, tied_embeddings(arch.config), arch.config.get("model_type")
        )
    planned = plan_tensors(arch, stream, type_name)
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_name)
    add_general(writer, arch, model_name, type_name)
    vocab = add_vocab(writer, base_folder, tokenizer, int(arch.config["vocab_size"]))
    for t in planned:
        writer.add_tensor_info(t.name, _byte_shape(t), _numpy_dtype(t.qtype), t.nbytes, raw_dtype=t.qtype)
    threads = max(1, min(4, os.cpu_count() or 1))
    try:
        writer.write_header_to_file(path=Path(out))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        by_name = {p.hf_name: p for p in planned if p.hf_name is not None}
        extras = [p for p in planned if p.hf_name is None]
        count = len(planned)
        done = 0
        for extra, data in zip(extras, (d for _, d in extra_tensors(arch)), strict=True):
            write_tensor_pieces(writer, [quantise(data, extra.qtype)], extra.nbytes)
            done += 1
        # a tensor the merge leaves as it is comes as a FileSlice, read in row blocks
        merged = stream_merged_tensors(stream, adapter, dtype, cancel=cancel, reuse_buffers=True, file_slices=True)
        for hf_name, tensor in merged:
            p = by_name.get(hf_name)
            if p is None:
                continue  # a rotary cache llama.cpp computes itself
            report(Progress(done, count, f"{WRITING_STAGE} {done + 1}/{count}", "tensors"))
            try:
                write_tensor_pieces(writer, converted_pieces(tensor, p, threads), p.nbytes)
            except ValueError as exc:  # a size that is not the planned one
                raise UserError(f"{hf_name}: {exc}", "the checkpoint's headers do not match its tensors") from exc
            done += 1
        report(Progress(count, count, f"{WRITING_STAGE} {count}/{count}", "tensors"))
    finally:
        writer.close()
    return vocab


def _byte_shape(p: PlannedTensor) -> tuple[int, ...]:
    import gguf

    if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return p.shape
    return (*p.shape[:-1], p.nbytes // max(1, math.prod(p.shape[:-1])))


def _numpy_dtype(qtype: Any) -> np.dtype[Any]:
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.dtype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.dtype(np.float16)
    return np.dtype(np.uint8)
