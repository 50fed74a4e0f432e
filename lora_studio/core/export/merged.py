"""Merged GGUF, streamed through llama.cpp's own converter: base shards in, one GGUF out.

The converter of the pinned llama.cpp (``converter.conversion``) does everything a GGUF needs: the architecture's
hyperparameters, the tokenizer, tensor names and transforms (rotary permutations, fused projections, norm offsets),
types and quantisation. LoRA Studio only hands it the merged tensors: the converter reads each base tensor lazily,
and for an adapted weight the LoRA update is added as that tensor is read, with the streaming merge's own arithmetic
(``merge.streaming.merged_tensor``: PEFT's ``merge_and_unload`` bits, in the base's dtype). So the file holds the
tensors ``convert_hf_to_gguf.py`` writes from the merged Hugging Face folder, without that folder, and with one
tensor in memory at a time. A dry run of the same converter plans the export (every tensor, its type and size, the
tokenizer) before a byte is written.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.core._compat.ggml_quantize import ggml_quantisers
from lora_studio.core._compat.gguf_progress import reporting_writes
from lora_studio.core._compat.gguf_reader import fast_gguf_reads
from lora_studio.core.errors import UserError
from lora_studio.core.export.converter import conversion, converter_architecture, converter_refusals
from lora_studio.core.export.gguf_types import llama_file_type
from lora_studio.core.merge.streaming import StreamingAdapter, merged_tensor
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch

WRITING_STAGE = "writing GGUF tensor"
PREPARING_STAGE = "preparing the GGUF (llama.cpp's converter)"
# what the written types become in the converter's terms (a K-quant is written as f16/bf16, then quantised)
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# a tensor the converter passes through unchanged is written in row blocks of about this many elements once it has
# twice as many (an embedding or output head: otherwise the whole tensor in float32 at once, and its mapped pages)
CHUNK_ELEMENTS = 8 * 1024 * 1024


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order, as the converter queues it
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


@dataclass(frozen=True)
class VocabSummary:
    model: str  # tokenizer.ggml.model: "gpt2", "llama", ...
    pre: str
    size: int
    chat_template: bool


@dataclass(frozen=True)
class ConverterPlan:
    architecture: str  # the Hugging Face class, e.g. "Qwen3ForCausalLM"
    gguf_architecture: str  # llama.cpp's, e.g. "qwen3"
    tensors: list[PlannedTensor]
    vocab: VocabSummary | None  # None: planned without the tokenizer


def plan_tensors(base_folder: Path, type_name: str, *, tokenizer: bool = True) -> ConverterPlan:
    """Every tensor of the GGUF in file order, its type and size, and the tokenizer: llama.cpp's converter in a
    dry run (headers and the tokenizer are read; no tensor is). Whatever the converter refuses is a UserError.
    ``tokenizer=False`` leaves the tokenizer out (``vocab`` is None): an export reads it anyway before writing a
    byte, and it is a second of a small model's export. Remembered for the folder as it is (its files' sizes and
    times), so the window's plan and the export that follows it run the dry run once."""
    folder = Path(base_folder).absolute()
    files = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))
    key = (folder, type_name, files)
    with _plans_lock:
        remembered = _plans.get(key)
    if remembered is not None and (remembered.vocab is not None or not tokenizer):
        return remembered
    plan = _plan(folder, type_name, tokenizer)
    with _plans_lock:
        _plans[key] = plan
        while len(_plans) > 8:
            del _plans[next(iter(_plans))]
    return plan


_plans: dict[tuple, ConverterPlan] = {}
_plans_lock = threading.Lock()


def _plan(base_folder: Path, type_name: str, tokenizer: bool) -> ConverterPlan:
    model = _converter_model(
        base_folder, base_folder / "plan.gguf", type_name, None, None, dry_run=True, tokenizer=tokenizer
    )
    with converter_refusals(base_folder):
        model.prepare_tensors()
        model.prepare_metadata(vocab_only=False)
    writer = model.gguf_writer
    planned = [
        PlannedTensor(name, tuple(info.shape), info.dtype, int(info.nbytes))
        for shard in writer.tensors
        for name, info in shard.items()
    ]
    vocab = _vocab_summary(writer) if tokenizer else None
    return ConverterPlan(model.hf_architecture, model.gguf_architecture, planned, vocab)


def converter_for(base_folder: Path, type_name: str) -> Any:
    """llama.cpp's converter for ``base_folder`` in a dry run, without tokenizer or adapter: its tensor names and
    transforms (``converted``, ``converter_name``, ``model_tensors``) for reading the base as the file holds it."""
    return _converter_model(
        base_folder, base_folder / "plan.gguf", type_name, None, None, dry_run=True, tokenizer=False
    )


def write_merged_gguf(
    out: Path,
    base_folder: Path,
    adapter: StreamingAdapter | None,
    dtype: str,
    type_name: str,
    model_name: str,
    *,
    vocab_from: Path | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> VocabSummary:
    """Write the GGUF of ``base_folder`` (+ ``adapter`` merged in, in ``dtype``) to ``out`` with llama.cpp's
    converter, tensor by tensor. ``vocab_from``: a GGUF whose tokenizer the file takes as it is (the GGUF a base
    was opened from: llama.cpp's own reading of that tokenizer) instead of converting the folder's."""
    cancel = cancel or CancelToken()
    report(Progress(0, None, PREPARING_STAGE))
    model = _converter_model(
        base_folder, Path(out), type_name, adapter, dtype, model_name=model_name, vocab_from=vocab_from
    )

    def before_tensor(index: int, count: int, name: str) -> None:
        cancel.raise_if_cancelled()
        report(Progress(index, count, f"{WRITING_STAGE} {index + 1}/{count}", "tensors"))

    with ggml_quantisers():  # queued (and, for a tensor written in row blocks, quantised at write time) with ggml's
        with converter_refusals(base_folder):
            model.prepare_tensors()
            model.prepare_metadata(vocab_only=False)
        writer = model.gguf_writer
        count = sum(len(shard) for shard in writer.tensors)
        reporting_writes(writer, before_tensor)
        try:
            writer.write_header_to_file(path=Path(out))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()
    report(Progress(count, count, f"{WRITING_STAGE} {count}/{count}", "tensors"))
    return _vocab_summary(writer)


def _converter_model(
    base_folder: Path,
    out: Path,
    type_name: str,
    adapter: StreamingAdapter | None,
    dtype: str | None,
    *,
    dry_run: bool = False,
    model_name: str | None = None,
    vocab_from: Path | None = None,
    tokenizer: bool = True,
) -> Any:
    """An instance of the converter's class for this base, reading the adapter's merged tensors."""
    import gguf

    if type_name not in CONVERTER_TYPES:
        raise UserError(f"llama.cpp's converter writes {', '.join(CONVERTER_TYPES)}, not {type_name}")
    package = conversion()
    folder = Path(base_folder)
    with converter_refusals(folder):
        hparams = package.ModelBase.load_hparams(folder, False)
    arch = converter_architecture(hparams)
    merging = _merging_class(arch.model_class, adapter, dtype, vocab_from, tokenizer)
    with converter_refusals(folder):
        model = merging(
            folder,
            gguf.LlamaFileType(llama_file_type(type_name)),
            out,
            hparams=arch.config,
            dry_run=dry_run,
            model_name=model_name,
        )
    model.hf_architecture = arch.hf_name
    model.gguf_architecture = arch.gguf_name
    return model


def _merging_class(
    model_class: Any,
    adapter: StreamingAdapter | None,
    dtype: str | None,
    vocab_from: Path | None = None,
    tokenizer: bool = True,
) -> Any:
    """The converter's class, reading each adapted weight with its LoRA update added (and taking its tokenizer
    from the GGUF ``vocab_from`` when given; no tokenizer at all for ``tokenizer=False``)."""
    import torch

    package = conversion()
    lazy_tensor = package.LazyTorchTensor
    out_dtype = getattr(torch, dtype) if dtype else None
    merged_names: set[str] = set()

    class MergingModel(model_class):
        model_arch = model_class.model_arch

        def modify_tensors(self, data_torch: Any, name: str, bid: int | None) -> list[tuple[str, Any]]:
            produced = list(super().modify_tensors(data_torch, name, bid))
            if not self.lazy or name in merged_names or name not in self.model_tensors:
                return produced
            # only what the converter hands on as it got it: the rows of the file, cast as a whole tensor would be
            return [(new, _in_row_blocks(self.model_tensors[name], t) if t is data_torch else t) for new, t in produced]

        def converted(self, data: Any, name: str) -> list[tuple[str, Any]]:
            """The converter's own tensors from checkpoint tensor ``name`` holding ``data`` (eager, float32), as its
            writing loop makes them (block id from the name) but without the row-block wrapping above."""
            bid = next((int(part) for part in name.split(".") if part.isdecimal()), None)
            return list(model_class.modify_tensors(self, data, name, bid))

        def set_vocab(self) -> None:
            if not tokenizer:
                return
            if vocab_from is None:
                super().set_vocab()
            else:
                copy_tokenizer(vocab_from, self.gguf_writer)

        def index_tensors(self, remote_hf_model_id: str | None = None) -> dict[str, Any]:
            tensors: dict[str, Any] = super().index_tensors(remote_hf_model_id)
            if adapter is None:
                return tensors
            assert out_dtype is not None  # a merge has a dtype
            for target, update in adapter.updates.items():
                name = self.converter_name(target, tensors)
                merged_names.add(name)
                load = tensors[name]
                merge = merge_fn(update, target in adapter.transposed, out_dtype)
                if self.lazy:
                    tensors[name] = lambda load=load, merge=merge: lazy_tensor._wrap_fn(merge, meta_noop=out_dtype)(
                        load()
                    )
                else:
                    tensors[name] = lambda load=load, merge=merge: merge(load())
            for target, full in adapter.replacements.items():
                name = self.converter_name(target, tensors)
                # a saved full tensor (modules_to_save) replaces the base's, in the base's dtype as PEFT loads it
                replacement = full.to(out_dtype)
                tensors[name] = lambda t=replacement: lazy_tensor.from_eager(t) if self.lazy else t
            return tensors

        def converter_name(self, target: str, tensors: dict[str, Any]) -> str:
            """The converter's name of a checkpoint tensor (its ``filter_tensors`` may rename or drop it)."""
            item = self.filter_tensors((target, lambda: None))
            if item is None or item[0] not in tensors:
                raise UserError(
                    f"the adapter changes {target}, which llama.cpp's converter leaves out of the GGUF",
                    "export a merged Hugging Face folder instead",
                )
            return str(item[0])

    return MergingModel


def _in_row_blocks(load: Any, tensor: Any) -> Any:
    """``tensor`` (a lazy 2-D tensor the converter queues as the file has it, cast to float32 when it was neither
    float16 nor float32) as gguf's ``LazyChunkedTensor``: each block of rows read from the file, cast and quantised
    as it is written. Small tensors, and anything else, stay as they are."""
    import gguf
    import torch

    shape = tuple(tensor.shape)
    small = len(shape) != 2 or shape[0] * shape[1] < 2 * CHUNK_ELEMENTS
    if small or tensor.dtype not in (torch.float16, torch.float32):
        return tensor
    rows, columns = shape
    step = max(1, CHUNK_ELEMENTS // columns)
    dtype = tensor.dtype
    lazy_tensor = conversion().LazyTorchTensor

    def block(first: int) -> Any:
        def read() -> Any:
            # a fresh tensor of the file each time: the mapping of only these rows, let go after the block
            rows_read = lazy_tensor.to_eager(load())[first : first + step]
            return rows_read.to(dtype).contiguous().numpy()

        return read

    return gguf.LazyChunkedTensor([block(first) for first in range(0, rows, step)], shape, tensor.numpy().dtype)


def copy_tokenizer(source: Path, writer: Any) -> None:
    """Every ``tokenizer.*`` field of the GGUF ``source`` into ``writer``, as the file has it."""
    import gguf

    with fast_gguf_reads():
        reader = gguf.GGUFReader(str(source))
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)


def merge_fn(update: tuple[Any, torch.Tensor, torch.Tensor, float], transposed: bool, dtype: torch.dtype) -> Any:
    kind, a, b, scaling = update

    def merge(weight: torch.Tensor) -> torch.Tensor:
        # a copy in the merge dtype: the converter's tensor may be a copy-on-write view of the shard
        return merged_tensor(weight.to(dtype, copy=True), kind, a, b, scaling, transposed)

    return merge


def _vocab_summary(writer: Any) -> VocabSummary:
    kv = {key: value.value for shard in writer.kv_data for key, value in shard.items()}
    tokens = kv.get("tokenizer.ggml.tokens") or []
    return VocabSummary(
        str(kv.get("tokenizer.ggml.model", "")),
        str(kv.get("tokenizer.ggml.pre", "")),
        len(tokens),
        "tokenizer.chat_template" in kv,
    )
