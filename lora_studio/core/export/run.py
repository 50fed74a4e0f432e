"""Export to GGUF: plan, write (atomically), verify in llama.cpp, and write the serving bundle.

``plan_export`` reads headers only and says what the export needs (size, peak memory, disk) or
why it is refused; ``export_gguf`` runs it as a long job (``cancel``, ``report``): the file is
written to a temporary sibling and renamed when complete, so a cancel, a crash or a full disk
leaves no file. Formats:

* ``gguf``: the adapter merged into the base (or the base alone), streamed through llama.cpp's own converter
  (core/export/merged.py); K-quants go through an f16 (bf16 for a bf16 base) temporary file and llama.cpp's quantiser;
* ``gguf-lora``: the adapter alone, through llama.cpp's LoRA converter (core/export/adapter.py), for ``--lora`` on any
  GGUF of the base.

Both use the converter of the pinned llama.cpp (core/export/converter.py), so every architecture it converts exports.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio import __version__
from lora_studio.core._compat.gguf_reader import fast_gguf_reads
from lora_studio.core.errors import UserError
from lora_studio.core.export import runtime
from lora_studio.core.export import verify as export_verify
from lora_studio.core.export.adapter import TYPE_HINT, adapter_refusal, type_refusal, write_adapter_gguf
from lora_studio.core.export.bundle import base_gguf_for, saved_rank, write_bundle
from lora_studio.core.export.carried import (
    CHANGED_FLOOR,
    CORRELATION_FLOOR,
    CarriedAdapter,
    measure_carried,
)
from lora_studio.core.export.converter import (
    PINNED_VERSION,
    ConverterArchitecture,
    converter_architecture,
    converter_refusal,
    with_architectures,
)
from lora_studio.core.export.gguf_types import K_QUANT_SOURCE, OUTPUT_TYPES, llama_file_type, output_type
from lora_studio.core.export.merged import VocabSummary, plan_tensors, write_merged_gguf
from lora_studio.core.export.request import (
    CARRIED_BADGES,
    FORMATS,
    MLX_FORMATS,
    WORKING_SET,
    ExportPlan,
    ExportRequest,
    ExportResult,
    adapter_reference,
)
from lora_studio.core.export.serving_plan import ServingPlan, serving_plan
from lora_studio.core.io.atomic import atomic_output_file
from lora_studio.core.io.paths import check_output_apart, free_disk
from lora_studio.core.merge.model_card import quantised_base_card
from lora_studio.core.merge.plan import AdapterSpec, base_dtype, input_paths
from lora_studio.core.merge.quantized import MergeTarget, check_merge_into, recorded_quantization
from lora_studio.core.merge.streaming import load_streaming_adapter, stream_plan, streaming_refusal
from lora_studio.core.model.config import gguf_config, read_config, tied_embeddings
from lora_studio.core.model.estimate import read_footprint
from lora_studio.core.model.file_reads import CarriedReads, carried_reads, take_reads
from lora_studio.core.model.identity import hub_id
from lora_studio.core.model.quantize import Quantize, check_quantize_choice
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.system.memory import format_bytes
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_studio.core.merge import verify as merge_verify
    from lora_studio.core.session import Session


def plan_export(request: ExportRequest, *, tokenizer: bool = True) -> ExportPlan:
    """What the export needs, from headers alone; ``refusal`` says why it cannot start. ``tokenizer=False``: the
    converter's plan leaves out the tokenizer (the export reads, and refuses, it anyway before writing a byte)."""
    if request.format in MLX_FORMATS:
        from lora_studio.core.export.mlx import plan_mlx

        return plan_mlx(request)
    type_name = request.type_name
    llama_cpp = runtime.llama_cpp_version()

    def refused(reason: str, hint: str = "") -> ExportPlan:
        return ExportPlan(request.format, type_name, 0, 0, 0, None, 0, False, llama_cpp, reason, hint)

    if request.format not in FORMATS:
        return refused(f"unknown export format {request.format!r}", f"choose one of {', '.join(FORMATS)}")
    if type_name not in OUTPUT_TYPES:
        return refused(f"unknown GGUF type {type_name!r}", f"choose one of {', '.join(OUTPUT_TYPES)}")
    try:
        adapters = [AdapterSpec(request.adapter_label or "", request.adapter)] if request.adapter else []
        check_output_apart(request.out, {**input_paths(request.source, adapters), "base GGUF": request.base_gguf})
    except UserError as exc:
        return refused(exc.message, exc.hint)
    gguf_base = request.source.gguf_file is not None
    if reason := converter_refusal():
        return refused(reason, runtime.INSTALL_HINT)
    try:
        arch = converter_architecture(base_config(request.source))
        stream = None if gguf_base else stream_plan(request.source.path, base_dtype(request.source))
    except UserError as exc:
        return refused(exc.message, exc.hint)
    spec = output_type(type_name)
    qlora = request.qlora()
    try:
        if request.quantize is not None:
            check_quantize_choice(request.quantize)
        check_merge_into(request.merge_into, qlora[0] if qlora else None)
    except UserError as exc:
        return refused(exc.message, exc.hint)
    if qlora is not None and gguf_base:
        return refused(
            "an adapter trained on a quantised base merges into a GGUF from a safetensors base",
            "export it adapter-only (--format gguf-lora) for this GGUF, or open the base's Hugging Face folder",
        )
    if request.format == "gguf-lora":
        if request.adapter is None:
            return refused("an adapter-only GGUF needs an adapter", "pass --adapter PATH")
        if reason := type_refusal(type_name):
            return refused(reason, TYPE_HINT)
        reason = adapter_refusal(request.adapter, arch.config)
        if reason:
            return refused(reason, "export a merged GGUF instead (--format gguf)")
        size = _adapter_bytes(request.adapter, type_name)
        tensors = 0
        peak = size * 4 + WORKING_SET
        disk = size
    elif stream is None:  # a GGUF base: merged through its dequantised weights, saved for the converter a moment
        footprint = read_footprint(request.source)  # read once per file: the GGUF's reader is slow
        params, tensors = footprint.params, footprint.tensors
        size = int(params * spec.bits_per_weight / 8)
        disk = params * 4 + size + (params * 2 if spec.writer == "llama.cpp" else 0)
        peak = params * 4 * 2 + _adapter_bytes(request.adapter, "f32") + WORKING_SET
    else:
        if request.adapter is not None:
            reason = streaming_refusal(request.adapter, stream.sources, tied_embeddings(arch.config))
            if reason:
                return refused(
                    f"the streaming GGUF export cannot merge this adapter exactly: {reason}",
                    "merge it into a Hugging Face folder first (in-memory engine), then export that folder",
                )
        written = _written_type(type_name, base_dtype(request.source))
        try:
            planned = plan_tensors(request.source.path, written, tokenizer=tokenizer).tensors
        except UserError as exc:
            return refused(exc.message, exc.hint)
        tensors = len(planned)
        intermediate = sum(p.nbytes for p in planned)
        if spec.writer == "llama.cpp":
            size = sum(_k_quant_bytes(p.name, p.shape, p.nbytes, type_name, spec.bits_per_weight) for p in planned)
            disk = intermediate + size
        else:
            size = intermediate
            disk = size
        # the converter computes one tensor at a time: in float32, with its LoRA update, and quantised
        largest = stream.largest_tensor_elements
        peak = largest * 16 + _adapter_bytes(request.adapter, "f32") + WORKING_SET
    if qlora is not None and stream is not None:
        # the merge target is measured on the base in full precision and quantised, side by side
        peak = max(peak, sum(info.nbytes for _, info in stream.sources.values()) * 2 + WORKING_SET)
    if request.verify:
        # the reference model (base + adapter in the base's dtype; a GGUF dequantised to float32), then llama.cpp's
        # copy: one at a time
        if stream is None:
            reference = read_footprint(request.source).params * 4
        else:
            reference = sum(info.nbytes for _, info in stream.sources.values())
        peak = max(peak, reference + WORKING_SET, size + WORKING_SET)
    free = free_disk(request.out)
    quantiser = request.format == "gguf" and spec.writer == "llama.cpp"
    plan = ExportPlan(request.format, type_name, size, peak, disk, free, tensors, quantiser, llama_cpp)
    if free is not None and free < disk:
        return replace(plan, refusal=f"needs {format_bytes(disk)} of disk, {format_bytes(free)} is free")
    return plan


# llama.cpp's K-quant mixes, roughly: embeddings and output at q6_k; a row that does not fill the
# 256-wide super-blocks falls back to a legacy type (bits per weight of each)
_K_FALLBACK_BITS = {"q4_k_m": 5.5, "q5_k_m": 6.0, "q6_k": 8.5}
_Q6_K_BITS, _Q8_0_BITS = 6.5625, 8.5


def _k_quant_bytes(name: str, shape: tuple[int, ...], planned_bytes: int, type_name: str, bits: float) -> int:
    """About how many bytes llama.cpp's quantiser writes for one tensor (norms and biases stay as planned)."""
    if len(shape) < 2:
        return planned_bytes
    fits = shape[-1] % 256 == 0
    if name.startswith(("token_embd", "output.")):
        bits = _Q6_K_BITS if fits else _Q8_0_BITS
    elif not fits:
        bits = _K_FALLBACK_BITS.get(type_name, bits)
    return int(math.prod(shape) * bits / 8)


def _adapter_bytes(adapter: Path | None, type_name: str) -> int:
    if adapter is None:
        return 0
    from lora_studio.core.adapters.files import stored_values

    per = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.0625}[type_name]
    return int(stored_values(adapter) * per)


def export_gguf(
    request: ExportRequest,
    *,
    session: Session | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    in_worker_process: bool = False,
) -> ExportResult:
    """Write, verify and bundle the export. ``session``: a loaded session holding the adapter (by
    ``request.adapter_name``) whose model is the verification reference, instead of loading one.

    ``in_worker_process``: the window's way. The file is written and checked in a worker process, whose memory
    goes back to the system when it ends: the converter's and llama.cpp's native buffers, kept in part by the
    allocator after each export, grew a window left open all day by ~2 MiB an export. The session's model still
    gives the reference outputs, here, before the worker starts."""
    if request.format in MLX_FORMATS:
        from lora_studio.core.export.mlx import export_mlx

        return export_mlx(request, session=session, cancel=cancel, report=report)
    if not in_worker_process:
        return _export_gguf(request, session, None, cancel=cancel, report=report)
    from lora_studio.core.system.child_process import run_in_child_process

    cancel = cancel or CancelToken()
    plan = plan_export(request, tokenizer=False)
    if plan.refusal:  # said before the reference is spent on it, or a worker is started
        raise UserError(plan.refusal, plan.hint)
    reference, tokenizer, carried = None, None, CarriedReads()
    session = _reference_session(session, request)
    if session is not None and request.verify and runtime.llama_cpp_version() is not None:
        reference = adapter_reference(request, session, cancel, report)
    if request.source.gguf_file:
        # what the window has read of the GGUF (its configuration, its tensor list, its tokenizer) goes with the
        # work: read again in the worker, ~55 s for Gemma 3's 262k-token vocabulary
        carried = carried_reads(request.source.file)
        tokenizer = session.tokenizer if session is not None else None
    return run_in_child_process(
        _export_in_worker,
        request,
        plan,
        reference,
        tokenizer,
        carried,
        cancel=cancel,
        report=report,
        name="lora-studio-export",
    )


def _export_in_worker(
    request: ExportRequest,
    plan: ExportPlan,
    reference: merge_verify.Reference | None,
    tokenizer: PreTrainedTokenizerBase | None,
    carried: CarriedReads,
    *,
    cancel: CancelToken,
    report: Report,
) -> ExportResult:
    take_reads(carried)
    return _export_gguf(request, None, reference, plan=plan, tokenizer=tokenizer, cancel=cancel, report=report)


def _reference_session(session: Session | None, request: ExportRequest) -> Session | None:
    """The session whose model the written file is checked against, if it can be: not on a quantised base (the file
    holds the full weights: its reference is the model in full precision) nor for an adapter trained on one (the
    reference is then the base with the weights the merge chose)."""
    if session is None or session.quantize is not None or request.qlora() is not None:
        return None
    return session


def _export_gguf(
    request: ExportRequest,
    session: Session | None,
    reference: merge_verify.Reference | None,
    *,
    plan: ExportPlan | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> ExportResult:
    """:func:`export_gguf` here; ``reference``: the adapter model's outputs, already computed; ``plan`` and
    ``tokenizer``: the base's, already read."""
    from lora_studio.core.model.loading import load_tokenizer

    cancel = cancel or CancelToken()
    started = time.perf_counter()
    session = _reference_session(session, request)
    if plan is None:
        plan = plan_export(request, tokenizer=False)
    if plan.refusal:
        raise UserError(plan.refusal, plan.hint)
    if request.source.gguf_file and request.base_gguf is None:
        # the adapter of a GGUF base is checked, and served, on that very file
        request = replace(request, base_gguf=request.source.file)
    type_name = plan.type
    arch = converter_architecture(base_config(request.source))
    report(Progress(0, None, "reading the tokenizer"))
    if tokenizer is None:
        tokenizer = session.tokenizer if session is not None else load_tokenizer(request.source)
    out = Path(request.out).absolute()
    vocab = carried = target = None
    details: dict = {"plan": plan.to_json(), "converter": converter_details(arch)}
    with ExitStack() as stack:
        work = request  # what is written and checked: for a QLoRA adapter, the base with the weights chosen
        if (qlora := request.qlora()) is not None:
            work, target = stack.enter_context(_qlora_base(request, *qlora, out, cancel, report))
        tmp = stack.enter_context(atomic_output_file(out, overwrite=request.overwrite))
        if request.format == "gguf-lora":
            assert request.adapter is not None  # plan_export refuses an adapter-only export without one
            details["adapter"] = write_adapter_gguf(
                tmp, arch.config, request.adapter, type_name, cancel=cancel, report=report
            )
        else:
            vocab, carried = _write_merged(work, arch, plan, tokenizer, tmp, cancel, report)
        cancel.raise_if_cancelled()
        verification = _verify(work, tokenizer, type_name, tmp, session, reference, cancel, report)
    report(Progress(1, 1, "writing the serving bundle", "steps"))
    base_gguf, make_base = _served_base(request, out)
    bundle = write_bundle(
        out,
        tokenizer,
        export_verify.hf_stop_tokens(tokenizer, request.source.path),
        export_card(request, type_name, out, verification, arch, carried, target),
        base_gguf=base_gguf,
        peft_adapter=Path(request.adapter).absolute() if request.adapter else None,
        adapter_name=request.adapter_label,
        # vLLM serves a Hugging Face model: a GGUF base only by its Hub id
        base_model=hub_id(request.source) or (None if request.source.gguf_file else str(request.source.path)),
        rank=saved_rank(Path(request.adapter)) if request.adapter else None,
        make_base=make_base,
        serving_plan=_serving_plan(request, arch.config),
        qlora_nf4=request.adapter is not None and (recorded_quantization(request.adapter) or {}).get("type") == "nf4",
    )
    report(Progress(1, 1, f"export {verification.status}", "steps"))
    return ExportResult(
        out,
        request.format,
        type_name,
        out.stat().st_size,
        time.perf_counter() - started,
        verification,
        bundle,
        vocab,
        details,
        carried,
        target,
        base_gguf if make_base is not None else None,
    )


def _one_line(text: str) -> str:
    """Generated text in a list item: its line breaks shown as ⏎ (a blank line would end the list)."""
    return " ⏎ ".join(part.strip() for part in str(text).splitlines() if part.strip())


def base_config(source: ModelSource) -> dict:
    """The base's Hugging Face configuration (its config.json, or what transformers reads from its GGUF file), with
    the ``architectures`` llama.cpp's converter picks its class by."""
    return with_architectures(gguf_config(source) if source.gguf_file else read_config(source))


def converter_details(arch: ConverterArchitecture) -> dict:
    """Which converter wrote the file: the result's and the card's record."""
    return {
        "converter": f"llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py (llama-cpp-python {PINNED_VERSION})",
        "architecture": arch.hf_name,
        "gguf_architecture": arch.gguf_name,
    }


def _serving_plan(request: ExportRequest, config: dict) -> ServingPlan | None:
    """How many adapters like this one vLLM holds beside the base on the request's GPU (None: no adapter)."""
    if request.adapter is None:
        return None
    from lora_studio.core.adapters.files import stored_values
    from lora_studio.core.export.bundle import vllm_max_lora_rank

    adapter_params = stored_values(Path(request.adapter))
    rank = vllm_max_lora_rank(saved_rank(Path(request.adapter)))
    params = read_footprint(request.source).params
    return serving_plan(config, params, adapter_params, rank, request.serve_gpu_gib)


def _written_type(type_name: str, dtype: str) -> str:
    """What the converter writes: the type itself, or for a K-quant the f16 (bf16 for a bf16 base) file that
    llama.cpp's quantiser reads."""
    if output_type(type_name).writer != "llama.cpp":
        return type_name
    return "bf16" if dtype == "bfloat16" else K_QUANT_SOURCE


def _served_base(request: ExportRequest, out: Path) -> tuple[Path | None, str | None]:
    """An adapter-only file is served on its base as a GGUF: the one it was checked on, else an f16 one beside it,
    with the command that writes it (the LoRA is never the model). A merged file is served alone: (None, None)."""
    if request.format != "gguf-lora":
        return None, None
    if request.base_gguf is not None:
        return request.base_gguf.absolute(), None
    base = base_gguf_for(request.source.path, out)
    if base.is_file():
        return base, None
    q = shlex.quote
    make = f"lora-studio export {q(str(request.source.path))} --format gguf --type f16 --out {q(str(base))}"
    return base, make


def _write_merged(
    request: ExportRequest,
    arch: ConverterArchitecture,
    plan: ExportPlan,
    tokenizer: PreTrainedTokenizerBase,
    tmp: Path,
    cancel: CancelToken,
    report: Report,
) -> tuple[VocabSummary, CarriedAdapter | None]:
    """The merged GGUF into ``tmp``; a K-quant through an f16 (bf16 for a bf16 base) file and llama.cpp's quantiser.
    A GGUF base goes through its dequantised weights, saved beside ``tmp`` for the converter and removed after; the
    file then keeps that GGUF's own tokenizer. With an adapter, how much of it the written file carries."""
    dtype = base_dtype(request.source)
    written = _written_type(plan.type, dtype)
    quantiser = written != plan.type
    target = tmp.with_name(f"{tmp.name}.{written}") if quantiser else tmp
    with ExitStack() as stack:
        folder, vocab_from = request.source.path, None
        if request.source.gguf_file:
            folder = stack.enter_context(_dequantised_base(request, tmp, tokenizer, cancel, report))
            vocab_from = request.source.file
        adapter = None
        if request.adapter is not None:
            stream = stream_plan(folder, dtype)
            adapter = load_streaming_adapter(
                request.adapter, stream.sources, tied_embeddings(arch.config), arch.config.get("model_type")
            )
        try:
            vocab = write_merged_gguf(
                target,
                folder,
                adapter,
                dtype,
                written,
                _model_name(request),
                vocab_from=vocab_from,
                cancel=cancel,
                report=report,
            )
            if quantiser:
                runtime.quantise_file(target, tmp, plan.type, plan.output_bytes, cancel=cancel, report=report)
        finally:
            if quantiser:
                target.unlink(missing_ok=True)
        carried = None
        if adapter is not None:
            carried = measure_carried(tmp, folder, adapter, dtype, written, plan.type, cancel=cancel, report=report)
    return vocab, carried


@contextmanager
def _qlora_base(
    request: ExportRequest, quantize: Quantize, compute_dtype: str, beside: Path, cancel: CancelToken, report: Report
) -> Iterator[tuple[ExportRequest, MergeTarget]]:
    """The merge's own choice of weights for an adapter trained on a quantised base (core/merge/quantized.py:
    measured on the verification prompts unless asked), and the request to write and check: the same one for the
    checkpoint's weights, else one whose base is a folder of the weights the adapter learned on (dequant(Wq) in the
    quantised layers), saved beside the output and removed afterwards. The adapter is then streamed onto that base
    as onto any other, so the file's check and carried-adapter measure compare with the chosen weights."""
    import shutil
    import tempfile

    from lora_studio.core.merge.quantized import choose_merge_target
    from lora_studio.core.model.sources import resolve_source
    from lora_studio.core.session import Session, release_memory

    assert request.adapter is not None  # qlora() is None without an adapter
    name = request.adapter_label or "adapter"
    session = Session()
    try:
        session.load(request.source, dtype=base_dtype(request.source), cancel=cancel, report=report)
        session.attach(Path(request.adapter), name, cancel=cancel, report=report)
        session.activate(name)
        target = choose_merge_target(
            session,
            request.source,
            Path(request.adapter),
            name,
            quantize,
            compute_dtype,
            request.merge_into or "auto",
            request.prompts,
            request.new_tokens,
            cancel=cancel,
            report=report,
        )
        if target.chosen == "original":
            session.close()
            yield request, target
            return
        report(Progress(0, None, "saving the weights the adapter learned on for llama.cpp's converter"))
        with tempfile.TemporaryDirectory(prefix=f".{beside.name}.", dir=beside.parent) as work:
            folder = Path(work) / "base"
            # the job's own session: PEFT's layers taken out (not merged), their base weights saved as they are now
            session.model.unload().save_pretrained(folder)
            for item in request.source.path.iterdir():  # the tokenizer and generation files, as the base has them
                if item.is_file() and not (folder / item.name).exists() and _tokenizer_file(item):
                    shutil.copy2(item, folder / item.name)
            session.close()
            release_memory()
            cancel.raise_if_cancelled()
            yield replace(request, source=resolve_source(str(folder)), quantize=None, merge_into=None), target
    finally:
        session.close()


def _tokenizer_file(path: Path) -> bool:
    return path.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf") and not path.name.endswith(".index.json")


DEQUANTISING_STAGE = "dequantising the base GGUF for llama.cpp's converter"


@contextmanager
def _dequantised_base(
    request: ExportRequest, beside: Path, tokenizer: PreTrainedTokenizerBase, cancel: CancelToken, report: Report
) -> Iterator[Path]:
    """The GGUF base's weights as transformers dequantises them, saved as a Hugging Face folder beside the output
    (removed afterwards): what the converter reads. The quantisation error of that GGUF stays in them. With the
    tokenizer read from the GGUF: the file keeps the GGUF's own vocabulary, but some of the converter's classes
    count the folder's tokens (Gemma 3 drops the embedding rows past them)."""
    import tempfile

    from lora_studio.core.model.loading import load_model
    from lora_studio.core.session import release_memory

    report(Progress(0, None, DEQUANTISING_STAGE))
    with tempfile.TemporaryDirectory(prefix=f".{beside.name}.", dir=beside.parent) as work:
        folder = Path(work) / "base"
        model = load_model(request.source, dtype=base_dtype(request.source), cancel=cancel, report=report)
        try:
            model.save_pretrained(folder)
        finally:
            del model
            release_memory()
        tokenizer.save_pretrained(folder)
        cancel.raise_if_cancelled()
        yield folder


def _model_name(request: ExportRequest) -> str:
    base = hub_id(request.source) or request.source.label
    if request.adapter is None:
        return str(base)
    return f"{base} + {request.adapter_label}"


def _verify(
    request: ExportRequest,
    tokenizer: PreTrainedTokenizerBase,
    type_name: str,
    gguf: Path,
    session: Session | None,
    reference: merge_verify.Reference | None,
    cancel: CancelToken,
    report: Report,
) -> export_verify.GgufVerification:
    if not request.verify:
        return export_verify.skipped(type_name, "not asked (--no-verify)")
    version = runtime.llama_cpp_version()
    if version is None:
        return export_verify.skipped(type_name, f"llama.cpp is not installed; {runtime.INSTALL_HINT}")
    if reference is None:
        reference = adapter_reference(request, session, cancel, report)
    cancel.raise_if_cancelled()
    with ExitStack() as stack:
        model, lora, threshold_type = gguf, None, type_name
        if request.format == "gguf-lora":
            lora = gguf
            model = request.base_gguf or stack.enter_context(_temporary_base(request, gguf, cancel, report))
            threshold_type = _file_type_name(model) or type_name
        report(Progress(0, None, export_verify.RUNTIME_STAGE))
        n_ctx = max(len(s) for s in reference.sequences) + 8
        try:
            runner = stack.enter_context(runtime.GgufRunner(model, lora=lora, n_ctx=max(64, n_ctx)))
        except runtime.LlamaCppCannotRun as exc:  # the file is ours and complete; only its check cannot run here
            return export_verify.skipped(type_name, str(exc))
        outputs = export_verify.compare_outputs(runner, reference, cancel, report)
        template = export_verify.check_template(runner, tokenizer, request.source.path)
        sample = export_verify.sample_continuations(runner, reference, tokenizer)
    return export_verify.verdict(
        threshold_type,
        outputs,
        template,
        len(reference.sequences),
        f"llama.cpp (llama-cpp-python {version})",
        sample,
    )


@contextmanager
def _temporary_base(request: ExportRequest, beside: Path, cancel: CancelToken, report: Report) -> Iterator[Path]:
    """A base GGUF (f16) written beside the adapter GGUF just to verify it on, removed afterwards."""
    path = beside.with_name(beside.name + ".base-f16")
    try:
        write_merged_gguf(
            path, request.source.path, None, base_dtype(request.source), "f16", "base", cancel=cancel, report=report
        )
        yield path
    finally:
        path.unlink(missing_ok=True)


def _file_type_name(path: Path) -> str | None:
    """The output type of an existing GGUF (from general.file_type), for the thresholds."""
    try:
        import gguf

        with fast_gguf_reads():
            reader = gguf.GGUFReader(str(path))
        field_ = reader.fields.get("general.file_type")
        if field_ is None:
            return None
        value = int(field_.parts[field_.data[0]][0])
    except Exception:  # noqa: BLE001 - an unreadable type only means the default thresholds
        return None
    return {llama_file_type(name): name for name in OUTPUT_TYPES}.get(value)


def export_card(
    request: ExportRequest,
    type_name: str,
    out: Path,
    verification: export_verify.GgufVerification,
    arch: ConverterArchitecture,
    carried: CarriedAdapter | None = None,
    target: MergeTarget | None = None,
) -> str:
    """What the file is and how it was proven: the bundle's README and the window's summary."""
    badge = verification.status.upper()
    lines = [
        f"**Verification: {badge}** — {verification.summary()}",
        *(["", f"**Adapter carried: {CARRIED_BADGES[carried.status]}** — {carried.summary()}"] if carried else []),
        "",
        f"- file: `{out.name}` ({request.format}, {type_name})",
        f"- base: {hub_id(request.source) or request.source.label}",
        *(
            [
                f"- merged into the weights of {request.source.file.name} as transformers dequantises them: the "
                "file carries that GGUF's quantisation error, then its own type's"
            ]
            if request.source.gguf_file and request.format == "gguf"
            else []
        ),
        f"- adapter: {request.adapter_label or 'none'}",
        f"- written by LoRA Studio {__version__} with llama.cpp's own converter (llama-cpp-python {PINNED_VERSION}), "
        f"as {arch.hf_name} → {arch.gguf_name}",
    ]
    if verification.sample:
        s = verification.sample
        lines += [
            "",
            f"Greedy continuation of “{s['prompt']}”:",
            "",
            f"- adapter model (transformers + PEFT): “{_one_line(s['adapter'])}”",
            f"- this file in llama.cpp: “{_one_line(s['llama_cpp'])}”",
        ]
    if verification.template is not None and verification.template.problems:
        lines += ["", "Template and token problems:", *[f"- {p}" for p in verification.template.problems]]
    if verification.thresholds:
        agreement, kl = verification.thresholds
        lines += ["", f"Thresholds for {verification.type}: greedy agreement ≥ {agreement:.0%}, top-k KL ≤ {kl:g}."]
    if target is not None:
        lines += quantised_base_card(target.to_json())
    if carried is not None and carried.tensors:
        lines += [
            "",
            "## The adapter in the file's weights",
            "",
            "Each adapted tensor of this file against the base exported alone to the same type (quantised by ggml "
            "as llama.cpp does, row by row): the share of weights with a non-zero update whose quantised value "
            f"changed (floor {CHANGED_FLOOR:.0%}), and the correlation of that change with the update ΔW (floor "
            f"{CORRELATION_FLOOR:g}). ⚠ marks a tensor under either floor: its update is mostly rounded away.",
            "",
            *carried.table(),
        ]
        if carried.left_out:
            lines += ["", "Not measured: " + "; ".join(f"`{k}` ({v})" for k, v in carried.left_out.items())]
    return "\n".join(lines)
