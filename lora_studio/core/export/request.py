"""What an export is asked for, what it needs and what it gave: shared by the GGUF export (core/export/run.py) and
the mlx-lm adapter export (core/export/mlx.py), with the adapter model both are checked against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lora_studio.core.export import verify as export_verify
from lora_studio.core.export.bundle import ServingBundle
from lora_studio.core.export.carried import CarriedAdapter
from lora_studio.core.export.gguf_types import DEFAULT_TYPE
from lora_studio.core.export.merged import VocabSummary
from lora_studio.core.export.serving_plan import DEFAULT_GPU_GIB
from lora_studio.core.merge import verify as merge_verify
from lora_studio.core.merge.plan import base_dtype
from lora_studio.core.merge.quantized import MergeInto, MergeTarget, recorded_quantization
from lora_studio.core.model.quantize import Quantize
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.system.memory import format_bytes
from lora_studio.core.tasks import CancelToken, Progress, Report

if TYPE_CHECKING:
    from lora_studio.core.session import Session

Format = Literal["gguf", "gguf-lora", "mlx", "peft"]
FORMATS: tuple[Format, ...] = ("gguf", "gguf-lora", "mlx", "peft")
GGUF_FORMATS: tuple[Format, ...] = ("gguf", "gguf-lora")  # core/export/run.py: files for llama.cpp
MLX_FORMATS: tuple[Format, ...] = ("mlx", "peft")  # core/export/mlx.py: an adapter for mlx-lm, or one from it
DEFAULT_ADAPTER_TYPE = "f16"
CARRIED_BADGES = {"carried": "✔ carried", "washed out": "⚠ washed out", "not measured": "not measured"}
WORKING_SET = 300 * 1024**2  # Python, torch and the tokenizer beside the tensors in flight


@dataclass
class ExportRequest:
    source: ModelSource
    out: Path
    format: Format = "gguf"
    type: str | None = None  # None: q8_0 for a merged GGUF, f16 for an adapter
    adapter: Path | None = None  # None with "gguf": the base alone
    adapter_name: str | None = None  # the session's name of the adapter (its folder name by default)
    verify: bool = True
    overwrite: bool = False
    base_gguf: Path | None = None  # "gguf-lora": the base GGUF to verify (and serve) the adapter on
    prompts: Sequence[str] = merge_verify.PROMPTS
    new_tokens: int = merge_verify.NEW_TOKENS
    serve_gpu_gib: float = DEFAULT_GPU_GIB  # the GPU the vLLM serving plan fits adapters on
    # an adapter trained on a quantised base (QLoRA): the quantisation it learned on (default: its lora_studio.json
    # record) and which weights its update is added to (core/merge/quantized.py; default: measured)
    quantize: Quantize | None = None
    merge_into: MergeInto | None = None

    def qlora(self) -> tuple[Quantize, str] | None:
        """(quantisation, compute dtype) of the base the adapter learned on, for a merged GGUF; None otherwise."""
        if self.format != "gguf" or self.adapter is None:
            return None
        record = recorded_quantization(self.adapter)
        quantize = self.quantize or (record["type"] if record else None)
        if quantize is None:
            return None
        compute = record.get("compute_dtype") if record and record["type"] == quantize else None
        return quantize, compute or base_dtype(self.source)

    @property
    def adapter_label(self) -> str | None:
        """The adapter's name: the one given, else the session's rule for a folder name."""
        from lora_studio.core.session import adapter_name_for

        if self.adapter_name:
            return self.adapter_name
        return adapter_name_for(Path(self.adapter)) if self.adapter is not None else None

    @property
    def type_name(self) -> str:
        if self.type:
            return self.type.lower()
        if self.format in MLX_FORMATS:
            return "f32"  # mlx-lm's and PEFT's factors are written in float32
        return DEFAULT_ADAPTER_TYPE if self.format == "gguf-lora" else DEFAULT_TYPE


@dataclass(frozen=True)
class ExportPlan:
    format: Format
    type: str
    output_bytes: int
    peak_memory_bytes: int
    disk_needed_bytes: int
    disk_free_bytes: int | None
    tensors: int
    quantiser: bool  # written by llama.cpp's quantiser from the converter's f16 file
    llama_cpp: str | None  # the installed llama-cpp-python version
    refusal: str | None = None
    hint: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.refusal:
            return self.refusal
        return (
            f"{self.type} GGUF of about {format_bytes(self.output_bytes)}; peak memory about "
            f"{format_bytes(self.peak_memory_bytes)}; needs {format_bytes(self.disk_needed_bytes)} of disk"
            + (f" ({format_bytes(self.disk_free_bytes)} free)" if self.disk_free_bytes is not None else "")
        )


@dataclass
class ExportResult:
    out: Path
    format: Format
    type: str
    bytes_written: int
    seconds: float
    verification: export_verify.GgufVerification
    bundle: ServingBundle | None
    vocab: VocabSummary | None = None
    details: dict = field(default_factory=dict)
    carried: CarriedAdapter | None = None  # a merged file of an adapter: how much of it the file's weights carry
    quantized_base: MergeTarget | None = None  # a QLoRA adapter: the weights its update was added to, and why
    base_to_write: Path | None = None  # an adapter-only file: the base GGUF its serving commands name, not yet written

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "format": self.format,
            "type": self.type,
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "verification": self.verification.to_json(),
            "bundle": self.bundle.to_json() if self.bundle else None,
            "vocab": asdict(self.vocab) if self.vocab else None,
            "carried": self.carried.to_json() if self.carried else None,
            "quantized_base": self.quantized_base.to_json() if self.quantized_base else None,
            **self.details,
        }


def adapter_reference(
    request: ExportRequest, session: Session | None, cancel: CancelToken, report: Report
) -> merge_verify.Reference:
    """The adapter model's greedy continuations (the session's model when given, else loaded for the job)."""
    from lora_studio.core.session import Session, release_memory

    report(Progress(0, None, merge_verify.REFERENCE_STAGE))
    owned = None
    name = request.adapter_label
    if session is None:
        owned = session = Session()
        session.load(request.source, dtype=base_dtype(request.source), cancel=cancel, report=report)
        if request.adapter is not None:
            assert name is not None
            session.attach(Path(request.adapter), name, cancel=cancel, report=report)
    try:
        with session.lock, session.variant_selected(name):
            return merge_verify.reference_outputs(
                session.model, session.tokenizer, request.prompts, request.new_tokens, cancel, report
            )
    finally:
        if owned is not None:
            owned.close()
            release_memory()
