"""Planning a merge: what is asked (adapters, options), and what each engine would need, from headers only.

``plan_merge`` reads headers only and says, before anything starts, what each
engine would need (peak RAM/VRAM, disk), which one runs, and refuses when the
request, the base or the disk does not allow the merge. It also reads what a merge
needs to know about its base (config, dtype, tied embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.combinations import check_combination, check_members, member_from_config
from lora_studio.core.errors import UserError, first_and_more
from lora_studio.core.io import paths
from lora_studio.core.io.safetensors_format import read_headers
from lora_studio.core.merge import verify as verification_mod
from lora_studio.core.merge.quantized import check_merge_into, recorded_quantization
from lora_studio.core.model.config import read_config, tied_embeddings
from lora_studio.core.model.dtypes import DTYPE_BYTES, DTYPES, ST_TO_NAME
from lora_studio.core.model.quantize import check_quantize_choice
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.system.memory import format_bytes

if TYPE_CHECKING:
    from lora_studio.core.session import Session, SessionState

EngineName = Literal["streaming", "in-memory"]
ENGINES: tuple[EngineName, ...] = ("streaming", "in-memory")
DEFAULT_SHARD_BYTES = 4 * 1024**3
RUNTIME_BYTES = 450 * 1024**2  # Python + torch + transformers + PEFT imported, measured on CPU
DISK_MARGIN_BYTES = 64 * 1024**2
# The tokenizer files an output folder gets (outputs.copy_tokenizer); counted in the disk figure here.
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "vocab*.json",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template*",
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path
    weight: float = 1.0  # in a combination its weight; alone its LoRA scale (ΔW = weight·(alpha/r)·B·A)


@dataclass
class MergeOptions:
    out: Path
    dtype: str | None = None  # None: the base's dtype (the session's, when merging a session)
    engine: EngineName | None = None  # None: streaming where it applies, else in-memory
    combination: str | None = None  # required for more than one adapter
    density: float | None = None
    safe_merge: bool = False  # in-memory: PEFT's NaN/Inf check (the streaming engine always checks)
    verify: bool = True
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    verify_prompts: tuple[str, ...] = verification_mod.PROMPTS
    verify_tokens: int = verification_mod.NEW_TOKENS
    # an adapter trained on a quantised base (QLoRA): that quantisation, and which base weights to merge into
    # (auto: measured; core/merge/quantized.py). None: the adapter's own record decides (lora_studio.json)
    quantize: str | None = None
    merge_into: str | None = None
    # a base saved quantised (bitsandbytes): the 16/32-bit folder it was quantised from, whose weights are the
    # "original" ones (the saved base stays the quantised one the adapter learned on)
    full_precision: Path | None = None


@dataclass(frozen=True)
class EnginePrediction:
    engine: EngineName
    available: bool
    reason: str  # why it is unavailable, or what it does
    peak_ram_bytes: int  # the merge itself
    peak_vram_bytes: int
    verify_ram_bytes: int  # the verification afterwards (0 without it)


@dataclass
class MergePlan:
    engine: EngineName | None  # the engine that would run; None when refused
    dtype: str
    predictions: dict[str, EnginePrediction]
    output_bytes: int
    disk_free_bytes: int | None
    refusal: str | None = None  # set: the merge must not start
    refusal_hint: str = ""
    resize_vocabulary: bool = False  # the adapter brings added tokens: the base is resized to its tokenizer (in-memory)

    @property
    def disk_ok(self) -> bool:
        return self.disk_free_bytes is None or self.disk_free_bytes >= self.output_bytes + DISK_MARGIN_BYTES

    def to_json(self) -> dict:
        d = asdict(self)
        d["disk_ok"] = self.disk_ok
        return d


# -- planning ------------------------------------------------------------------


def base_folder(source: ModelSource) -> Path | None:
    """The safetensors folder the streaming engine can read, or None."""
    if source.gguf_file:
        return None
    try:
        read_headers(source.path)
    except UserError:
        return None
    return source.path


def base_config(source: ModelSource) -> dict:
    """The base's config.json ({} for a GGUF base or a folder without one); UserError when it is damaged."""
    return read_config(source, missing_ok=True)


def base_dtype(source: ModelSource, session: Session | SessionState | None = None) -> str:
    """The dtype a merge keeps by default: the session's, else the checkpoint's."""
    if session is not None and session.dtype:
        return session.dtype
    cfg = base_config(source)
    for key in ("dtype", "torch_dtype"):
        if cfg.get(key) in DTYPES:
            return cfg[key]
    folder = base_folder(source)
    if folder is not None:
        sizes: dict[str, int] = {}
        for h in read_headers(folder):
            for info in h.tensors.values():
                if ST_TO_NAME.get(info.dtype) in DTYPES:
                    sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
        if sizes:
            return ST_TO_NAME[max(sizes, key=lambda st: sizes[st])]
    return "float32"


def _extra_files_bytes(source: ModelSource) -> int:
    total = 0
    if not source.gguf_file:
        for pattern in (*TOKENIZER_PATTERNS, "config.json", "generation_config.json"):
            for p in source.path.glob(pattern):
                if p.is_file():
                    total += p.stat().st_size
    return total + 1024**2


def plan_merge(
    source: ModelSource,
    adapters: Sequence[AdapterSpec],
    options: MergeOptions,
    *,
    session: Session | SessionState | None = None,
) -> MergePlan:
    """What each engine would need, which one runs, and whether the merge may start. Reads headers only.

    ``session``: the loaded :class:`Session` the merge would use, or its ``state()`` snapshot
    (what a planner on another thread passes: planning reads no model).
    """
    from lora_studio.core.merge.streaming import stream_plan, streaming_refusal

    _check_request(adapters, options)
    if options.full_precision is not None:  # a base saved quantised: merged from the folder it was quantised from
        source, options, _, _ = full_precision_source(source, options)
        session = None
    check_merge_into(options.merge_into, merge_quantization(options, adapters, session)[0])
    paths.check_output_apart(options.out, input_paths(source, adapters))
    resize = _check_base(source, adapters, session)
    dtype = options.dtype or base_dtype(source, session)
    elem = DTYPE_BYTES[dtype]
    adapter_bytes = sum(adapter_files.weights_file(a.path).stat().st_size for a in adapters)
    adapter_fp32 = adapter_bytes * 2 + adapter_bytes  # file bytes, float32 copies, products
    folder = base_folder(source)
    cfg = base_config(source)
    predictions: dict[str, EnginePrediction] = {}

    sp = None
    stream_reason = ""
    if folder is None:
        stream_reason = "the base is not a safetensors folder"
    else:
        sp = stream_plan(folder, dtype)
        if options.combination is not None or len(adapters) != 1:
            stream_reason = "weighted combinations are built by PEFT in memory"
        else:
            stream_reason = streaming_refusal(adapters[0].path, sp.sources, tied_embeddings(cfg)) or ""
        if not stream_reason and (resize or getattr(session, "tokenizer_source", None) is not None):
            stream_reason = "the vocabulary is resized to the adapter's tokenizer (added tokens)"
    if sp is not None:
        output_bytes = sp.out_bytes
        model_bytes = sp.out_bytes
        largest = sp.largest_tensor_elements
    else:
        from lora_studio.core.model.estimate import read_footprint

        fp = read_footprint(source)
        output_bytes = model_bytes = fp.params * elem
        largest = fp.params // 8  # no header to read: a conservative guess for the biggest tensor
    output_bytes += _extra_files_bytes(source)
    on_gpu = session is not None and session.device is not None and session.device.startswith("cuda")
    verify_one_model = model_bytes + adapter_fp32 + RUNTIME_BYTES if options.verify else 0

    stream_peak = RUNTIME_BYTES + largest * (4 + elem + 4 + 4) + adapter_fp32
    predictions["streaming"] = EnginePrediction(
        "streaming",
        not stream_reason,
        stream_reason or "reads and writes one tensor at a time",
        # with a session the reference is the loaded model; verification still loads the merged copy
        stream_peak,
        0,
        (model_bytes if options.verify else 0) if session is not None else verify_one_model,
    )
    # a quantised-base merge does not merge the session (see merge.run): the job loads the base in full precision
    if session is not None and session.loaded and not quantised_merge(options, adapters, session):
        extra = 2 * largest * elem
        predictions["in-memory"] = EnginePrediction(
            "in-memory",
            True,
            "merges the loaded session layer by layer",
            _current_rss() + (0 if on_gpu else extra),
            extra if on_gpu else 0,
            model_bytes + RUNTIME_BYTES if options.verify else 0,
        )
    else:
        peak = (
            RUNTIME_BYTES
            + model_bytes
            + adapter_fp32 * max(1, len(adapters) + (1 if options.combination else 0))
            + 2 * largest * elem
        )
        predictions["in-memory"] = EnginePrediction(
            "in-memory",
            True,
            "loads the base and the adapters, merges with PEFT",
            peak,
            0,
            peak + model_bytes if options.verify else 0,
        )

    engine = options.engine
    refusal, hint = None, ""
    if quantised_merge(options, adapters, session):
        engine = "in-memory"  # both candidate weights are measured on a loaded model
    if engine is None:
        engine = "streaming" if predictions["streaming"].available and not options.safe_merge else "in-memory"
    elif engine == "streaming" and not predictions["streaming"].available:
        refusal, hint = (
            f"the streaming engine cannot do this merge: {stream_reason}",
            "use the in-memory engine (--engine in-memory)",
        )
    free = paths.free_disk(options.out)
    plan = MergePlan(engine, dtype, predictions, output_bytes, free, resize_vocabulary=resize)
    if refusal is None and free is not None and not plan.disk_ok:  # disk_ok: unknown free space passes
        refusal = (
            f"the output needs about {format_bytes(output_bytes)} plus {format_bytes(DISK_MARGIN_BYTES)} kept free, "
            f"and only {format_bytes(free)} is free at {Path(options.out).absolute().parent}"
        )
        hint = "free some disk space or choose another output folder"
    if refusal:
        plan.engine, plan.refusal, plan.refusal_hint = None, refusal, hint
    return plan


def merge_quantization(
    options: MergeOptions, adapters: Sequence[AdapterSpec], session: Session | SessionState | None
) -> tuple[str | None, str | None]:
    """The quantisation an adapter learned on, and its compute dtype: asked (``options.quantize``), the session's
    (a base loaded quantised), or the adapter's own record (QLoRA, lora_studio.json); (None, None) for a plain merge.
    Such a merge measures its target weights in memory (core/merge/quantized.py)."""
    quantize, compute_dtype = options.quantize, None
    if getattr(session, "quantize", None) is not None:
        quantize, compute_dtype = quantize or getattr(session, "quantize", None), getattr(session, "dtype", None)
    if len(adapters) == 1 and options.combination is None:
        record = recorded_quantization(adapters[0].path)
        if record is not None and quantize in (None, record["type"]):
            quantize, compute_dtype = record["type"], record.get("compute_dtype") or compute_dtype
    return quantize, compute_dtype if quantize else None


def full_precision_source(
    source: ModelSource, options: MergeOptions
) -> tuple[ModelSource, MergeOptions, ModelSource | None, str | None]:
    """For a base saved quantised with bitsandbytes and the 16/32-bit folder it was quantised from
    (``options.full_precision``): that folder as the base to merge into, the options with the saved quantisation,
    the saved base (the quantised weights the adapter learned on, loaded as saved) and its compute dtype. Without
    ``full_precision``: everything as given."""
    if options.full_precision is None:
        return source, options, None, None
    from lora_studio.core.adapters.compatibility import quantization_label
    from lora_studio.core.model.quantize import saved_quantization
    from lora_studio.core.model.sources import resolve_source

    saved = saved_quantization(base_config(source))
    if saved is None:
        raise UserError(
            f"{source.label} is not saved quantised with bitsandbytes",
            "a full-precision folder is for merging into a base saved in 4 or 8 bits; merge without it",
        )
    kind, compute_dtype = saved
    full = resolve_source(str(options.full_precision))
    full_config = base_config(full)
    if full.gguf_file or quantization_label(full_config):
        raise UserError(f"{full.label} is not a 16/32-bit checkpoint", "name the folder the base was quantised from")
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if full_config.get(key) != base_config(source).get(key):
            raise UserError(
                f"{full.label} is not the model {source.label} was quantised from ({key}: "
                f"{full_config.get(key)} against {base_config(source).get(key)})",
                "name the folder the base was quantised from",
            )
    paths.check_output_apart(options.out, {"base model": source.path, "full-precision base": full.path})
    if options.quantize not in (None, kind):
        raise UserError(
            f"{source.label} is saved as {kind}, not {options.quantize}", f"drop --quantize, or pass {kind}"
        )
    return full, replace(options, quantize=kind, full_precision=None), source, compute_dtype


def quantised_merge(
    options: MergeOptions, adapters: Sequence[AdapterSpec], session: Session | SessionState | None
) -> bool:
    """Whether the merge is of an adapter trained on a quantised base (see :func:`merge_quantization`)."""
    return merge_quantization(options, adapters, session)[0] is not None


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def input_paths(source: ModelSource | None, adapters: Sequence[AdapterSpec] = ()) -> dict[str, Path | None]:
    """What a job reads, by what it is to the user: an output must stay apart from all of them."""
    base = None if source is None else source.path / source.gguf_file if source.gguf_file else source.path
    return {"base model": base, **{f"adapter {a.name}": Path(a.path) for a in adapters}}


def _check_request(adapters: Sequence[AdapterSpec], options: MergeOptions) -> None:
    if not adapters:
        raise UserError("no adapter given", "pass at least one --adapter")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise UserError(f"unknown dtype {options.dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if options.engine is not None and options.engine not in ENGINES:
        raise UserError(f"unknown engine {options.engine!r}", f"choose one of {', '.join(ENGINES)}")
    if options.verify_tokens < 1:
        raise UserError("verification needs at least one token", "use a positive number of tokens")
    if options.quantize is not None:
        check_quantize_choice(options.quantize)
        if options.combination is not None or len(adapters) != 1:
            raise UserError("a merge onto a quantised base takes one adapter", "merge the adapters one at a time")
        if options.engine == "streaming":
            raise UserError(
                "a merge onto a quantised base runs in memory (it measures both candidate weights)",
                "leave the engine to choose, or pass --engine in-memory",
            )

    if options.combination is None and len(adapters) == 1:
        from lora_studio.core.session import check_scale

        check_scale(adapters[0].weight)  # a single adapter's weight is its LoRA scale (PEFT's set_scale)
    else:
        check_combination(
            [a.name for a in adapters], [a.weight for a in adapters], options.combination, options.density
        )
    configs = []
    for a in adapters:
        configs.append(adapter_files.read_adapter_config(a.path))  # clear message for a missing or broken folder
        adapter_files.weights_file(a.path)
    # what the combination type needs of the adapters (equal ranks, ...): refused here, not after loading
    check_members([member_from_config(a.name, c) for a, c in zip(adapters, configs, strict=True)], options.combination)


def _check_lora_bias(adapter: Path, name: str, base_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """An adapter that trains LoRA biases (``lora_bias``) merges only into layers that have a bias: PEFT refuses the
    rest when it merges, after everything is loaded; said here, before."""
    if not adapter.is_dir():
        return  # a combination of the session: its members were checked
    lay = adapter_files.layout(adapter_files.tensor_shapes(adapter))
    lacking = [m for m, keys in lay.lora.items() if keys.bias and f"{m}.bias" not in base_shapes]
    if lacking:
        raise UserError(
            f"{name} trains LoRA biases (lora_bias) for {first_and_more(lacking)}, which has no bias in the base: "
            "PEFT cannot merge them",
            "use the adapter unmerged, or retrain it without lora_bias",
        )


def _check_base(source: ModelSource, adapters: Sequence[AdapterSpec], session: Session | SessionState | None) -> bool:
    """Refusals that depend on the base, before anything is written: code it would need, quantized weights,
    adapters whose shapes do not fit (headers only). Returns True when the single adapter brings added tokens
    and its own tokenizer, so the base must be resized to it (the in-memory engine does that)."""
    from lora_studio.core.adapters import compatibility
    from lora_studio.core.model.config import check_declared_layers
    from lora_studio.core.model.loading import check_remote_code

    cfg = base_config(source)
    # a base loaded quantised on load is merged from its full-precision checkpoint (merge.quantized); one saved
    # quantised has no full-precision weights to merge into
    loaded_quantised = getattr(session, "quantize", None) is None and getattr(session, "quantization", None)
    quant = compatibility.quantization_label(cfg) or loaded_quantised
    if quant:
        raise UserError(
            f"{source.label} is quantized ({quant}): "
            "merging into quantized weights would round the adapter's update away",
            "name the 16/32-bit folder it was quantised from (the Merge tab's 16-bit base; --full-precision in the "
            "command line), or merge into the full-precision base model",
        )
    folder = base_folder(source)
    shapes = compatibility.weight_shapes_from_headers(folder) if folder is not None else None
    if shapes is not None:
        check_declared_layers(cfg, shapes, source.label)
        for a in adapters:
            _check_lora_bias(Path(a.path), a.name, shapes)
    if session is not None:
        return False  # the session's adapters were checked against it when they were attached
    check_remote_code(source, False)
    if shapes is None:
        return False  # a GGUF base: the adapters are checked when the in-memory engine attaches them
    arch = (cfg.get("architectures") or [""])[0] if isinstance(cfg.get("architectures"), list) else ""
    resize = False
    for a in adapters:
        try:
            compatibility.check(
                Path(a.path), shapes, base_label=source.label, architecture=arch, model_type=cfg.get("model_type")
            )
        except compatibility.VocabularyMismatch as mismatch:
            if not (
                len(adapters) == 1 and mismatch.adapter_has_tokenizer and mismatch.adapter_vocab > mismatch.base_vocab
            ):
                raise
            resize = True
    return resize
