"""Merge LoRA adapters into their base and save a deployable model folder.

``plan_merge`` reads headers only and says, before anything starts, what each
engine would need (peak RAM/VRAM, disk) and refuses when the disk cannot hold the
output. ``merge_and_save`` then runs one of two engines that give the same bits
as PEFT's ``merge_and_unload``:

* streaming (core/merge_streaming.py): base safetensors -> output shards one tensor
  at a time; memory is about one tensor plus the adapter; the default where it applies
  (a safetensors base, one adapter, plain LoRA/rsLoRA/Conv1D/embeddings).
* in-memory (core/merge_in_memory.py): PEFT's own per-layer merge on a loaded
  PeftModel (a session's, or one loaded for the job), for DoRA, lora_bias, weighted
  combinations, GGUF bases and ``safe_merge``.

Everything is written into a temporary sibling folder that replaces ``out`` only at
the end (core/safetensors_io.atomic_output_dir): a cancel, crash or full disk leaves
no output folder. The saved folder is then verified against the adapter model and
the result recorded in its README.md model card.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from lora_studio import __version__
from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.merge import model_card
from lora_studio.core.merge import verify as verification_mod
from lora_studio.core.adapters.combinations import check_combination
from lora_studio.core.errors import UserError
from lora_studio.core.system.memory import format_bytes
from lora_studio.core.io.safetensors_io import DTYPE_SIZES, atomic_output_dir, read_ahead, read_headers, write_state_dict
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

ENGINES = ("streaming", "in-memory")
DTYPES = ("float32", "bfloat16", "float16")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_SHARD_BYTES = 4 * 1024**3
RUNTIME_BYTES = 450 * 1024**2  # Python + torch + transformers + PEFT imported, measured on CPU
DISK_MARGIN_BYTES = 64 * 1024**2
COMBINED_NAME = "lora_studio_combined"
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "vocab*.json", "merges.txt",
                      "*.tiktoken", "spiece.model", "sentencepiece*.model", "chat_template*", "preprocessor_config.json")
_ST_TO_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path
    weight: float = 1.0


@dataclass
class MergeOptions:
    out: Path
    dtype: Optional[str] = None  # None: the base's dtype (the session's, when merging a session)
    engine: Optional[str] = None  # None: streaming where it applies, else in-memory
    combination: Optional[str] = None  # required for more than one adapter
    density: Optional[float] = None
    safe_merge: bool = False  # in-memory: PEFT's NaN/Inf check (the streaming engine always checks)
    verify: bool = True
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    verify_prompts: tuple[str, ...] = verification_mod.PROMPTS
    verify_tokens: int = verification_mod.NEW_TOKENS


@dataclass(frozen=True)
class EnginePrediction:
    engine: str
    available: bool
    reason: str  # why it is unavailable, or what it does
    peak_ram_bytes: int  # the merge itself
    peak_vram_bytes: int
    verify_ram_bytes: int  # the verification afterwards (0 without it)


@dataclass
class MergePlan:
    engine: Optional[str]  # the engine that would run; None when refused
    dtype: str
    predictions: dict[str, EnginePrediction]
    output_bytes: int
    disk_free_bytes: Optional[int]
    refusal: Optional[str] = None  # set: the merge must not start
    refusal_hint: str = ""
    resize_vocabulary: bool = False  # the adapter brings added tokens: the base is resized to its tokenizer (in-memory)

    @property
    def disk_ok(self) -> bool:
        return self.disk_free_bytes is None or self.disk_free_bytes >= self.output_bytes + DISK_MARGIN_BYTES

    def to_json(self) -> dict:
        d = asdict(self)
        d["disk_ok"] = self.disk_ok
        return d


@dataclass
class MergeResult:
    out: Path
    engine: str
    dtype: str
    files: list[str]
    bytes_written: int
    seconds: float
    verification: Optional[verification_mod.Verification]
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"out": str(self.out), "engine": self.engine, "dtype": self.dtype, "files": self.files,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3),
                "verification": self.verification.to_json() if self.verification else None}


# -- planning ------------------------------------------------------------------

def _base_folder(source: ModelSource) -> Optional[Path]:
    """The safetensors folder the streaming engine can read, or None."""
    if source.gguf_file:
        return None
    try:
        read_headers(source.path)
    except UserError:
        return None
    return source.path


def _base_config(source: ModelSource) -> dict:
    path = source.path / "config.json"
    if source.gguf_file or not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON", "the model folder is damaged") from exc
    return cfg if isinstance(cfg, dict) else {}


def _tied(cfg: dict) -> bool:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def base_dtype(source: ModelSource, session=None) -> str:
    """The dtype a merge keeps by default: the session's, else the checkpoint's."""
    if session is not None and session.dtype:
        return session.dtype
    cfg = _base_config(source)
    for key in ("dtype", "torch_dtype"):
        if cfg.get(key) in DTYPES:
            return cfg[key]
    folder = _base_folder(source)
    if folder is not None:
        sizes: dict[str, int] = {}
        for h in read_headers(folder):
            for info in h.tensors.values():
                if info.dtype in _ST_TO_NAME:
                    sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
        if sizes:
            return _ST_TO_NAME[max(sizes, key=sizes.get)]
    return "float32"


def _free_disk(path: Path) -> Optional[int]:
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _extra_files_bytes(source: ModelSource) -> int:
    total = 0
    if not source.gguf_file:
        for pattern in TOKENIZER_PATTERNS + ("config.json", "generation_config.json"):
            for p in source.path.glob(pattern):
                if p.is_file():
                    total += p.stat().st_size
    return total + 1024**2


def plan_merge(source: ModelSource, adapters: Sequence[AdapterSpec], options: MergeOptions, *, session=None) -> MergePlan:
    """What each engine would need, which one runs, and whether the merge may start. Reads headers only."""
    from lora_studio.core.merge.streaming import stream_plan, streaming_refusal

    _check_request(adapters, options)
    resize = _check_base(source, adapters, session)
    dtype = options.dtype or base_dtype(source, session)
    elem = ELEMENT_BYTES[dtype]
    adapter_bytes = sum(adapter_files.weights_file(a.path).stat().st_size for a in adapters)
    adapter_fp32 = adapter_bytes * 2 + adapter_bytes  # file bytes, float32 copies, products
    folder = _base_folder(source)
    cfg = _base_config(source)
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
            stream_reason = streaming_refusal(adapters[0].path, sp.sources, _tied(cfg)) or ""
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
        "streaming", not stream_reason, stream_reason or "reads and writes one tensor at a time",
        # with a session the reference is the loaded model; verification still loads the merged copy
        stream_peak, 0, (model_bytes if options.verify else 0) if session is not None else verify_one_model)
    if session is not None and session.loaded:
        extra = 2 * largest * elem
        predictions["in-memory"] = EnginePrediction(
            "in-memory", True, "merges the loaded session layer by layer",
            _current_rss() + (0 if on_gpu else extra), extra if on_gpu else 0,
            model_bytes + RUNTIME_BYTES if options.verify else 0)
    else:
        peak = RUNTIME_BYTES + model_bytes + adapter_fp32 * max(1, len(adapters) + (1 if options.combination else 0)) + 2 * largest * elem
        predictions["in-memory"] = EnginePrediction(
            "in-memory", True, "loads the base and the adapters, merges with PEFT",
            peak, 0, peak + model_bytes if options.verify else 0)

    engine = options.engine
    refusal, hint = None, ""
    if engine is None:
        engine = "streaming" if predictions["streaming"].available and not options.safe_merge else "in-memory"
    elif engine == "streaming" and not predictions["streaming"].available:
        refusal, hint = f"the streaming engine cannot do this merge: {stream_reason}", "use the in-memory engine (--engine in-memory)"
    free = _free_disk(options.out)
    plan = MergePlan(engine, dtype, predictions, output_bytes, free, resize_vocabulary=resize)
    if refusal is None and not plan.disk_ok:
        refusal = f"the output needs about {format_bytes(output_bytes)} but only {format_bytes(free)} is free at {Path(options.out).absolute().parent}"
        hint = "free some disk space or choose another output folder"
    if refusal:
        plan.engine, plan.refusal, plan.refusal_hint = None, refusal, hint
    return plan




def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _check_request(adapters: Sequence[AdapterSpec], options: MergeOptions) -> None:
    if not adapters:
        raise UserError("no adapter given", "pass at least one --adapter")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise UserError(f"unknown dtype {options.dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if options.engine is not None and options.engine not in ENGINES:
        raise UserError(f"unknown engine {options.engine!r}", f"choose one of {', '.join(ENGINES)}")
    if options.verify_tokens < 1:
        raise UserError("verification needs at least one token", "use a positive number of tokens")
    check_combination([a.name for a in adapters], [a.weight for a in adapters], options.combination, options.density)
    for a in adapters:
        adapter_files.read_adapter_config(a.path)  # clear message for a missing or broken adapter folder
        adapter_files.weights_file(a.path)



# -- running ---------------------------------------------------------------------

def merge_and_save(source: ModelSource, adapters: Sequence[AdapterSpec], options: MergeOptions, *, session=None,
                   cancel: Optional[CancelToken] = None, report: Report = no_report) -> MergeResult:
    """Merge ``adapters`` into ``source`` and save the model folder ``options.out``; verify it unless told not to.

    With ``session`` (a loaded Session holding these adapters, by name), the in-memory
    engine merges that model without changing it, and it is the verification reference.
    """
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    plan = plan_merge(source, adapters, options, session=session)
    if plan.refusal:
        raise UserError(plan.refusal, plan.refusal_hint)
    engine, dtype = plan.engine, plan.dtype
    if session is not None:
        missing = [a.name for a in adapters if a.name not in session.adapters]
        if missing:
            raise UserError(f"adapter {missing[0]!r} is not attached to the session", "attach it before merging")
    provenance = _provenance(source, adapters, options, engine, dtype)
    owned = None  # a session this job loaded itself (freed at the end)
    restore = None
    try:
        with atomic_output_dir(Path(options.out), overwrite=options.overwrite) as tmp:
            if engine == "in-memory" and session is None:
                owned = session = _load_session(source, adapters, dtype, cancel, report, resize=plan.resize_vocabulary)
            name = None
            if session is not None:  # the adapter (or combination) to merge becomes active: it is the reference
                restore = (session.active_adapter, session.adapters_enabled)
                name = _select_adapter(session, adapters, options)
            if engine == "streaming":
                files, written = _run_streaming(source, adapters[0], dtype, tmp, options, cancel, report)
                _write_config_from_folder(source, tmp, dtype)
            else:
                files, written = _run_in_memory(session, name, dtype, tmp, options, cancel, report)
                _write_config_from_model(session.base_model(), source, tmp, dtype)
            _copy_tokenizer(source, tmp, session if engine == "in-memory" else None)
            cancel.raise_if_cancelled()
            verification = None
            if options.verify:
                verification = _verify(source, adapters, options, dtype, tmp, session, cancel, report)
            provenance["verification"] = verification.to_json() if verification else None
            provenance["output"] = str(Path(options.out).absolute())
            # paths need not be UTF-8 on Linux: escape what cannot be written rather than fail at the very end
            (tmp / "README.md").write_text(model_card.render(provenance), "utf-8", errors="backslashreplace")
            cancel.raise_if_cancelled()
            report(Progress(1, 1, "finishing", "steps"))
    finally:
        if session is not None and owned is None and restore is not None:
            _restore_session(session, restore)
        if owned is not None:
            owned.close()
    return MergeResult(Path(options.out).absolute(), engine, dtype, files, written, time.perf_counter() - started,
                       verification, provenance)


def _run_streaming(source, adapter: AdapterSpec, dtype, tmp: Path, options: MergeOptions, cancel, report):
    import torch

    from lora_studio.core.merge.streaming import load_streaming_adapter, stream_merged_tensors, stream_plan

    sp = stream_plan(source.path, dtype)
    loaded = load_streaming_adapter(adapter.path, sp.sources, _tied(_base_config(source)))
    targeted = set(loaded.updates)
    check = dtype == "float16"

    def checked():
        for name, t in stream_merged_tensors(sp, loaded, dtype, cancel=cancel, reuse_buffers=True, ring=2, file_slices=True):
            # fp16 can overflow where the float32 sum did not: never write Inf silently
            # (bfloat16 and float32 share float32's range: a finite base plus a finite update stays finite)
            if check and name in targeted and not bool(torch.isfinite(t).all()):
                raise UserError(f"merging {adapter.name} puts NaN/Inf into {name} in {dtype}",
                                "merge in bfloat16 or float32 instead")
            yield name, t

    # ring=2 + background: tensor i is written on a second thread while tensor i+1 is read and merged.
    # direct: this engine is for models too big to hold, where copying the output into the page cache costs
    # as much CPU as the merge; the in-memory engine's output goes through the cache, where its verification
    # reads it back.
    return _write(tmp, checked(), sp.out_plan, options, report, background=True, direct=True)


def _write(tmp: Path, tensors, out_plan, options: MergeOptions, report, background: bool = False, direct: bool = False):
    total = sum(DTYPE_SIZES[d] * _numel(s) for d, s in out_plan.values())
    count = len(out_plan)
    state = {"bytes": 0, "tensors": 0}

    def on_tensor(name, n):
        state["bytes"] += n
        state["tensors"] += 1
        report(Progress(state["bytes"], total, f"merging tensor {state['tensors']}/{count}", "bytes"))

    report(Progress(0, total, f"merging tensor 0/{count}", "bytes"))
    paths = write_state_dict(tmp, tensors, out_plan, max_shard_bytes=options.max_shard_bytes, on_tensor=on_tensor,
                             metadata={"merged_by": f"lora-studio {__version__}"}, background=background, direct=direct)
    return [p.name for p in paths], state["bytes"]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _load_session(source, adapters: Sequence[AdapterSpec], dtype, cancel, report, resize: bool = False):
    from lora_studio.core.session import Session

    session = Session()
    try:
        report(Progress(0, None, f"loading {source.label} in {dtype}"))
        session.load(source, dtype=dtype, cancel=cancel, report=report)
        for a in adapters:
            session.attach(a.path, a.name, resize_embeddings=resize, cancel=cancel, report=report)
    except BaseException:
        session.close()
        raise
    return session


def _select_adapter(session, adapters: Sequence[AdapterSpec], options: MergeOptions) -> str:
    """Make the adapter to merge active (building the weighted combination first); returns its name."""
    from lora_studio.core.adapters.combinations import add_combination

    if options.combination is None:
        name = adapters[0].name
    else:
        name = add_combination(session.model, [a.name for a in adapters], [a.weight for a in adapters],
                               options.combination, options.density, COMBINED_NAME)
    session.model.set_adapter(name)
    session.model.base_model.enable_adapter_layers()
    return name


def _restore_session(session, restore) -> None:
    active, enabled = restore
    with session.lock:
        if active is not None and active in session.adapters:
            session.activate(active)
        elif session.adapters:
            session.activate(session._active if session._active in session.adapters else next(iter(session.adapters)))
        if session.is_peft and COMBINED_NAME in session.model.peft_config:
            session.model.delete_adapter(COMBINED_NAME)  # after re-activating: PEFT warns when the active one goes
        if not enabled:
            session.disable_adapters()


def _run_in_memory(session, name: str, dtype, tmp: Path, options: MergeOptions, cancel, report):
    from lora_studio.core.merge.in_memory import InMemoryPlan

    with session.lock:
        plan = InMemoryPlan(session.model, name, dtype if dtype != session.dtype else None)
        return _write(tmp, plan.tensors(safe_merge=options.safe_merge, cancel=cancel), plan.shapes(), options, report)


def _clean_config(cfg: dict, dtype: str) -> dict:
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)  # the merged weights are plain floats
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    return cfg


def _write_config_from_folder(source: ModelSource, tmp: Path, dtype: str) -> None:
    cfg = _base_config(source)
    if not cfg:
        raise UserError(f"{source.label} has no config.json", "the model folder is incomplete")
    (tmp / "config.json").write_text(json.dumps(_clean_config(cfg, dtype), indent=2, sort_keys=True) + "\n", "utf-8")
    gen = source.path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, tmp / gen.name)  # verbatim: keeps the full EOS list


def _write_config_from_model(model, source: ModelSource, tmp: Path, dtype: str) -> None:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(tmp))
    path = tmp / "config.json"
    cfg = _clean_config(json.loads(path.read_text("utf-8")), dtype)
    if _tied(cfg) and _embeddings_saved_apart(tmp, model):
        # a head trained apart from the embedding (modules_to_save): tying them again on load would throw it away
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", "utf-8")
    gen = source.path / "generation_config.json"
    if not source.gguf_file and gen.is_file():
        shutil.copyfile(gen, tmp / gen.name)
    elif getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))


def _embeddings_saved_apart(tmp: Path, model) -> bool:
    """Whether the written shards hold both the input embedding and a separate output embedding."""
    names = {n for h in read_headers(tmp) for n in h.tensors}
    modules = {id(m): n for n, m in model.named_modules()}
    found = []
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        name = modules.get(id(emb)) if emb is not None else None
        found.append(name is not None and f"{name}.weight" in names)
    return all(found)


def _check_base(source: ModelSource, adapters: Sequence[AdapterSpec], session) -> bool:
    """Refusals that depend on the base, before anything is written: code it would need, quantized weights,
    adapters whose shapes do not fit (headers only). Returns True when the single adapter brings added tokens
    and its own tokenizer, so the base must be resized to it (the in-memory engine does that)."""
    from lora_studio.core.adapters import compatibility
    from lora_studio.core.model.loading import check_remote_code

    cfg = _base_config(source)
    quant = compatibility.quantization_label(cfg) or getattr(session, "quantization", None)
    if quant:
        raise UserError(f"{source.label} is quantized ({quant}): merging into quantized weights would round the adapter's update away",
                        "merge into the full-precision base model, then quantize the merged folder if you need to")
    if session is not None:
        return False  # the session's adapters were checked against it when they were attached
    check_remote_code(source, False)
    folder = _base_folder(source)
    if folder is None:
        return False  # a GGUF base: the adapters are checked when the in-memory engine attaches them
    shapes = compatibility.weight_shapes_from_headers(folder)
    arch = (cfg.get("architectures") or [""])[0] if isinstance(cfg.get("architectures"), list) else ""
    resize = False
    for a in adapters:
        try:
            compatibility.check(Path(a.path), shapes, base_label=source.label, architecture=arch)
        except compatibility.VocabularyMismatch as mismatch:
            if not (len(adapters) == 1 and mismatch.adapter_has_tokenizer and mismatch.adapter_vocab > mismatch.base_vocab):
                raise
            resize = True
    return resize


def _copy_tokenizer(source: ModelSource, tmp: Path, session) -> None:
    if session is not None and session.tokenizer is not None and (session.tokenizer_source is not None or source.gguf_file):
        session.tokenizer.save_pretrained(str(tmp))  # a resized vocabulary or a GGUF tokenizer: save what is in use
        return
    copied = 0
    if not source.gguf_file:
        for pattern in TOKENIZER_PATTERNS:
            for p in source.path.glob(pattern):
                if p.is_file() and not (tmp / p.name).exists():
                    shutil.copyfile(p, tmp / p.name)
                    copied += 1
    if not copied:
        from lora_studio.core.model.loading import load_tokenizer

        tokenizer = session.tokenizer if session is not None and session.tokenizer is not None else load_tokenizer(source)
        tokenizer.save_pretrained(str(tmp))
    stray = tmp / "adapter_config.json"
    if stray.exists():
        stray.unlink()


def _verify(source, adapters, options: MergeOptions, dtype, tmp: Path, session, cancel, report):
    """Reference outputs from the adapter model, then the saved folder loaded plainly and compared."""
    from lora_studio.core.session import release_memory

    read_ahead(tmp)  # streamed shards were written past the page cache: read them back while the reference runs
    report(Progress(0, 2, "verifying: running the adapter model", "steps"))
    owned = None
    if session is None:  # streaming without a session: load base + adapter just for the reference
        owned = session = _load_session(source, adapters, dtype, cancel, report)
        session.activate(adapters[0].name)
    try:
        with session.lock:
            ref = verification_mod.reference_outputs(session.model, session.tokenizer, options.verify_prompts, options.verify_tokens, cancel)
            device = session.device or "cpu"
    finally:
        if owned is not None:
            owned.close()  # free the reference before loading the merged model: one model in memory at a time
    release_memory()
    cancel.raise_if_cancelled()
    report(Progress(1, 2, "verifying: loading the saved folder", "steps"))
    merged = verification_mod.load_merged(tmp, dtype, device_map=device if device.startswith("cuda") else "cpu")
    try:
        result = verification_mod.compare(merged, ref, dtype, cancel)
    finally:
        del merged
        release_memory()
    report(Progress(2, 2, f"verification {result.status}", "steps"))
    return result


def _provenance(source: ModelSource, adapters: Sequence[AdapterSpec], options: MergeOptions, engine: str, dtype: str) -> dict:
    cfg_path = source.path / "config.json"
    base = {"label": source.label, "path": str(source.file), "kind": source.kind,
            "config_sha256": model_card.file_sha256(cfg_path) if not source.gguf_file and cfg_path.is_file()
            else model_card.file_sha256(source.file) if source.gguf_file else None}
    items = []
    for a in adapters:
        cfg = adapter_files.read_adapter_config(a.path)
        wf = adapter_files.weights_file(a.path)
        items.append({"name": a.name, "path": str(Path(a.path).absolute()), "weight": a.weight, "r": cfg.r,
                      "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
                      "target_modules": cfg.target_modules, "file": wf.name, "sha256": model_card.file_sha256(wf)})
    return {"tool": "lora-studio", "tool_version": __version__, "base": base, "adapters": items,
            "combination": options.combination, "density": options.density, "dtype": dtype, "engine": engine,
            "safe_merge": options.safe_merge, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
