"""How big a model is and whether it fits, read from file headers before loading anything."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lora_studio.core.errors import UserError
from lora_studio.core.io.safetensors_format import read_headers
from lora_studio.core.model.config import check_declared_layers, read_config, tied_embeddings
from lora_studio.core.model.dtypes import DTYPE_BYTES, ST_TO_NAME, check_dtype
from lora_studio.core.model.file_reads import FileReads, file_key
from lora_studio.core.model.quantize import saved_quantization
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.system import nvml
from lora_studio.core.system.devices import mps_here
from lora_studio.core.system.memory import format_bytes

if TYPE_CHECKING:
    import gguf

# Working memory on top of the weights while loading and running (buffers, caches,
# allocator slack): 10% or 200 MiB, whichever is larger.
OVERHEAD_FRACTION = 0.10
OVERHEAD_MIN_BYTES = 200 * 1024**2


@dataclass(frozen=True)
class ModelFootprint:
    """What the checkpoint holds, from headers alone."""

    architecture: str
    model_type: str
    params: int  # tied embeddings counted once
    checkpoint_dtype: str  # "float32", "bfloat16", "float16", or e.g. "gguf:Q4_1"
    tied_embeddings: bool
    checkpoint_bytes: int
    tensors: int = 0  # tensors the checkpoint holds, where its headers were read (0: not counted)
    # a GGUF's sizes from its metadata (a folder's are in its config.json): width, layers, vocabulary; 0 unknown
    gguf_sizes: tuple[int, int, int] = (0, 0, 0)


# "offload": fits only with part of the weights on the CPU (device_map "auto")
Verdict = Literal["fits", "offload", "does_not_fit"]


@dataclass(frozen=True)
class MemoryEstimate:
    footprint: ModelFootprint
    dtype: str
    device_map: str
    weights_bytes: int
    needed_bytes: int  # weights + working memory (+ transient for GGUF dequantisation)
    free_ram_bytes: int
    free_gpu_bytes: dict[str, int] = field(default_factory=dict)  # "cuda:N" -> free bytes
    verdict: Verdict = "fits"
    where: str = "cpu"  # "cpu" | "cuda:N" | "auto"
    explanation: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["footprint"] = asdict(self.footprint)
        return d


def read_footprint(source: ModelSource) -> ModelFootprint:
    if source.gguf_file:
        return gguf_tensors_read(source).footprint
    config = read_config(source)
    if not any(source.path.glob("*.safetensors")) and any(source.path.glob("*.bin")):
        return _meta_footprint(source, config)
    headers = read_headers(source.path)
    tied = tied_embeddings(config)
    names: set[str] = set()
    params = 0
    nbytes = 0
    dtypes: Counter = Counter()
    saved = saved_quantization(config)  # a checkpoint saved by bitsandbytes: packed codes and their block scales
    for header in headers:
        for info in header.tensors.values():
            names.add(info.name)
            nbytes += info.nbytes
            if saved is not None and _quantisation_state(info.name):
                continue  # absmax, quant_map, ...: the scales of the codes, not parameters of the model
            # 4-bit codes are packed two to a byte
            numel = info.numel * 2 if saved is not None and saved[0] != "int8" and info.dtype == "U8" else info.numel
            params += numel
            dtypes[info.dtype] += numel
    check_declared_layers(config, names, source.label)
    if tied:
        # Some checkpoints store lm_head even when tied; it is one tensor in memory.
        for head, emb in (
            ("lm_head.weight", "model.embed_tokens.weight"),
            ("lm_head.weight", "transformer.wte.weight"),
        ):
            if head in names and emb in names:
                for header in headers:
                    if head in header.tensors:
                        params -= header.tensors[head].numel
    st_dtype = dtypes.most_common(1)[0][0] if dtypes else "F32"
    if saved is not None:
        st_dtype = f"bitsandbytes {saved[0]}"
    archs = config.get("architectures") or ["?"]
    return ModelFootprint(
        str(archs[0]),
        str(config.get("model_type", "?")),
        params,
        ST_TO_NAME.get(st_dtype, st_dtype),
        tied,
        nbytes,
        len(names),
    )


def _meta_footprint(source: ModelSource, config: dict) -> ModelFootprint:
    """Count parameters of a .bin-only checkpoint by building the model on the meta device (nothing unpickled)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(source.path), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:
        raise UserError(f"cannot read the architecture of {source.label}: {exc}", "check config.json") from exc
    params = sum(p.numel() for p in model.parameters())  # tied parameters are one Parameter
    size = sum(p.stat().st_size for p in source.path.glob("*.bin"))
    archs = config.get("architectures") or [type(model).__name__]
    return ModelFootprint(
        str(archs[0]),
        str(config.get("model_type", "?")),
        params,
        str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        tied_embeddings(config),
        size,
    )


@dataclass(frozen=True)
class EmbeddingSample:
    """A few rows of a GGUF's token embedding as gguf dequantises them: what a load must have read from the file."""

    rows: tuple[int, ...]
    values: Any  # float32 array: the picked rows, one after another
    tensor_type: str  # the file's type of the embedding, e.g. "Q8_0"


@dataclass(frozen=True)
class GgufTensorsRead:
    """What one pass of gguf's reader over a file's tensors gives: its footprint, and its embedding's sample."""

    footprint: ModelFootprint
    embedding: EmbeddingSample | None  # None: the file has no token embedding


def gguf_tensors_read(source: ModelSource) -> GgufTensorsRead:
    """Remembered per file as it is: gguf's reader parses every token of the vocabulary in Python (~4 s for
    262k tokens), so the estimate, the plans and the check of a load share one read."""
    try:
        key = file_key(source.file)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UserError(f"{source.file.name} cannot be read ({reason})", "choose the GGUF file again") from exc
    return _GGUF_TENSORS.get(key, lambda: _read_gguf_tensors(source))


_GGUF_TENSORS: FileReads[GgufTensorsRead] = FileReads("gguf tensors")


def _read_gguf_tensors(source: ModelSource) -> GgufTensorsRead:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise UserError("reading .gguf files needs the 'gguf' package", "pip install gguf") from exc
    from lora_studio.core._compat.gguf_reader import fast_gguf_reads

    try:
        with fast_gguf_reads():
            reader = gguf.GGUFReader(str(source.file))
    except Exception as exc:
        raise UserError(
            f"{source.file.name} is damaged or not a GGUF file ({type(exc).__name__}: {exc})",
            "download or export it again",
        ) from exc
    size = source.file.stat().st_size
    damaged = not reader.tensors or any(int(t.data_offset) + int(t.n_bytes) > size for t in reader.tensors)
    if damaged:
        what = "holds no tensors" if not reader.tensors else "names tensor data past its end"
        raise UserError(f"{source.file.name} is damaged: it {what}", "download or export it again")
    arch = _gguf_field(reader, "general.architecture") or "?"
    names = {t.name for t in reader.tensors}
    params = sum(int(t.n_elements) for t in reader.tensors)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    sizes = (
        _whole(_gguf_field(reader, f"{arch}.embedding_length")),
        _whole(_gguf_field(reader, f"{arch}.block_count")),
        int(max(embedding.shape)) if embedding is not None and len(embedding.shape) else 0,
    )
    footprint = ModelFootprint(
        architecture=f"{arch} (GGUF)",
        model_type=str(arch),
        params=params,
        checkpoint_dtype="gguf:" + gguf_quantisation(reader),
        tied_embeddings="output.weight" not in names,
        checkpoint_bytes=size,
        tensors=len(reader.tensors),
        gguf_sizes=sizes,
    )
    return GgufTensorsRead(footprint, _embedding_sample(embedding))


def _embedding_sample(tensor: Any) -> EmbeddingSample | None:
    """The first, second, middle and last rows (a misread seen once got only the first row right)."""
    import gguf
    import numpy as np

    if tensor is None or not len(tensor.data):
        return None
    count = len(tensor.data)
    rows = tuple(sorted({0, 1 % count, count // 2, count - 1}))
    values = np.asarray(gguf.dequantize(tensor.data[list(rows)], tensor.tensor_type), dtype=np.float32)
    return EmbeddingSample(rows, values, tensor.tensor_type.name)


def _whole(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def gguf_quantisation(reader: Any) -> str:
    """The file's quantisation as llama.cpp names it: its ``general.file_type`` (Q4_K_M, Q8_0, F16, …), else the
    type that most weight bytes use (norms and biases are F32 in nearly every file, but few bytes)."""
    import gguf

    file_type = _gguf_field(reader, "general.file_type")
    if isinstance(file_type, int):
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    by_bytes: Counter = Counter()
    for t in reader.tensors:
        by_bytes[t.tensor_type.name] += int(t.n_bytes)
    return by_bytes.most_common(1)[0][0]


def _gguf_field(reader: gguf.GGUFReader, key: str) -> Any:  # a field's value: gguf reads it untyped
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a field this gguf version cannot decode reads as missing
        return None


def _default_dtype(footprint: ModelFootprint) -> str:
    return footprint.checkpoint_dtype if footprint.checkpoint_dtype in DTYPE_BYTES else "float32"


_STATE_PARTS = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.",
    ".SCB",
    ".weight_format",
)


def _quantisation_state(name: str) -> bool:
    return any(part in name for part in _STATE_PARTS)


def estimate(
    source: ModelSource,
    dtype: str | None = None,
    device_map: str = "cpu",
    *,
    footprint: ModelFootprint | None = None,
    gpus: list[nvml.GpuReading] | None = None,
    free_ram_bytes: int | None = None,
    quantize: str | None = None,
) -> MemoryEstimate:
    """Predict the memory a load needs and say whether and where it fits.

    ``gpus`` and ``free_ram_bytes`` default to live readings (NVML, psutil); tests pass their own. ``quantize``:
    the linear weights in 4 or 8 bits (bitsandbytes), the embeddings and head in ``dtype``.
    """
    footprint = footprint or read_footprint(source)
    dtype = dtype or _default_dtype(footprint)
    check_dtype(dtype)
    weights = footprint.params * DTYPE_BYTES[dtype]
    saved = None if source.gguf_file else saved_quantization(read_config(source))
    if (quantize or saved) and not source.gguf_file:
        kind = quantize or saved[0]  # type: ignore[index]  # one of the two is set
        weights = quantized_weight_bytes(footprint.params, read_config(source), dtype, kind)
    needed = weights + max(int(weights * OVERHEAD_FRACTION), OVERHEAD_MIN_BYTES)
    if source.gguf_file:
        needed += footprint.params * 4  # GGUF tensors are dequantised to float32 first
    free_ram_bytes, free_gpu = free_memory(free_ram_bytes, gpus)
    verdict, where, why = judge(device_map, needed, free_ram_bytes, free_gpu)
    return MemoryEstimate(footprint, dtype, device_map, weights, needed, free_ram_bytes, free_gpu, verdict, where, why)


# bytes per quantised value: the codes, and for 4 bits one float32 absmax per block of 64
QUANTIZED_BYTES = {"nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "int8": 1.0 + 4 / 4096}


def quantized_weight_bytes(params: int, config: dict, dtype: str, quantize: str) -> int:
    """The weights of a base quantised on load: its embeddings (and an untied head) stay in ``dtype``, the rest
    of its parameters, nearly all in linear layers, take QUANTIZED_BYTES each."""
    vocab = int(config.get("vocab_size") or 0)
    hidden = int(config.get("hidden_size") or 0)
    kept = vocab * hidden * (1 if tied_embeddings(config) else 2)
    kept = min(kept, params)
    return int(kept * DTYPE_BYTES[dtype] + (params - kept) * QUANTIZED_BYTES[quantize])


def free_memory(
    free_ram_bytes: int | None = None, gpus: list[nvml.GpuReading] | None = None
) -> tuple[int, dict[str, int]]:
    """Free RAM and free memory per GPU ("cuda:N"), read live (psutil, NVML) unless given."""
    if free_ram_bytes is None:
        import psutil

        free_ram_bytes = int(psutil.virtual_memory().available)
    if gpus is None:
        backend, _ = nvml.open_backend()
        try:
            gpus = nvml.read_all(backend)
        finally:
            if backend is not None:
                backend.close()
    return free_ram_bytes, {f"cuda:{g.index}": g.free_bytes for g in gpus}


def judge(
    device_map: str, needed: int, free_ram: int, free_gpu: dict[str, int], *, mps: bool | None = None
) -> tuple[Verdict, str, str]:
    """Whether ``needed`` bytes fit where ``device_map`` puts them: (verdict, where, one line saying why). ``mps``:
    whether Apple silicon's GPU runs here (read from torch when ``auto`` needs to know); its memory is the RAM."""
    if device_map == "mps":
        unified = f"{format_bytes(free_ram)} of unified memory free (the RAM the GPU shares)"
        if needed <= free_ram:
            return "fits", "mps", f"needs {format_bytes(needed)}, {unified}"
        return "does_not_fit", "mps", f"needs {format_bytes(needed)} but only {unified}"
    if device_map == "cpu":
        if needed <= free_ram:
            return "fits", "cpu", f"needs {format_bytes(needed)}, {format_bytes(free_ram)} RAM free"
        return "does_not_fit", "cpu", f"needs {format_bytes(needed)} but only {format_bytes(free_ram)} RAM is free"
    if device_map.startswith("cuda"):
        if device_map != "cuda" and not re.fullmatch(r"cuda:\d+", device_map):
            raise UserError(f"unknown device map {device_map!r}", "use cpu, cuda:N, mps or auto")
        if device_map not in free_gpu:
            return (
                "does_not_fit",
                device_map,
                f"{device_map} is not available (GPUs found: {', '.join(free_gpu) or 'none'})",
            )
        free = free_gpu[device_map]
        if needed <= free:
            return "fits", device_map, f"needs {format_bytes(needed)}, {format_bytes(free)} free on {device_map}"
        return (
            "does_not_fit",
            device_map,
            f"needs {format_bytes(needed)} but {device_map} has {format_bytes(free)} free (try device map 'auto')",
        )
    if device_map == "auto":
        for dev, free in free_gpu.items():
            if needed <= free:
                return "fits", dev, f"fits on {dev} ({format_bytes(free)} free)"
        if not free_gpu and (mps if mps is not None else mps_here()):
            return judge("mps", needed, free_ram, free_gpu)
        if not free_gpu:
            if needed <= free_ram:
                return "fits", "cpu", f"no GPU: loads on the CPU ({format_bytes(free_ram)} RAM free)"
            return (
                "does_not_fit",
                "cpu",
                f"needs {format_bytes(needed)} but only {format_bytes(free_ram)} RAM is free and there is no GPU",
            )
        if needed <= sum(free_gpu.values()) + free_ram:
            return "offload", "auto", f"spreads over {', '.join(free_gpu)} and CPU RAM (slower)"
        return (
            "does_not_fit",
            "auto",
            f"needs {format_bytes(needed)}; "
            f"GPUs and RAM together have {format_bytes(sum(free_gpu.values()) + free_ram)} free",
        )
    raise UserError(f"unknown device map {device_map!r}", "use cpu, cuda:N, mps or auto")
