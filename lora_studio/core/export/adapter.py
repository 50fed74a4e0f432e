"""Adapter-only GGUF: the LoRA factors in llama.cpp's layout, for ``llama-server --lora`` / ``--lora-scaled``.

As llama.cpp's ``convert_lora_to_gguf.py`` writes them: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted weight ``<name>.lora_a``
(PEFT's A, [r, in]) and ``<name>.lora_b`` (B, [out, r]), B's rows permuted like the base
weight's for Llama q/k. llama.cpp applies ``alpha / r`` with r read from each tensor; where
PEFT's scaling differs from that (rsLoRA's ``alpha / sqrt(r)``, alpha_pattern) the difference
is folded into B, so any scaling PEFT allows loads as PEFT applies it. The file works on any
GGUF of the same base, quantised ones included.

What llama.cpp's own converter fails on is refused with the reason: DoRA (magnitudes llama.cpp
does not apply), LoRA biases, modules_to_save / saved embeddings (full weights, not factors),
LoRA on the embedding or on a tied lm_head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio import __version__
from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError
from lora_studio.core.export.architecture import Architecture, permute_rows
from lora_studio.core.export.gguf_types import ggml_type
from lora_studio.core.export.merged import quantise, tensor_type
from lora_studio.core.model.config import tied_embeddings
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import numpy as np

ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")
WRITING_STAGE = "writing adapter tensor"


TYPE_HINT = "quantise the base GGUF instead: the adapter is small"


def type_refusal(type_name: str) -> str | None:
    """Why an adapter-only GGUF cannot have this type, or None."""
    if type_name in ADAPTER_TYPES:
        return None
    return f"an adapter-only GGUF is written as {', '.join(ADAPTER_TYPES)}, not {type_name}"


def adapter_refusal(adapter_folder: Path, arch: Architecture) -> str | None:
    """Why this adapter cannot be an adapter-only GGUF, or None."""
    config = adapter_files.read_adapter_config(adapter_folder)
    lay = adapter_files.layout(adapter_files.tensor_shapes(adapter_folder))
    name = Path(adapter_folder).name
    if config.peft_type != "LORA":
        return f"{name} is a {config.peft_type} adapter; llama.cpp loads LoRA adapters"
    if config.use_dora or any(m.magnitude for m in lay.lora.values()):
        return f"{name} is a DoRA adapter; llama.cpp does not apply DoRA's magnitudes"
    if any(m.bias for m in lay.lora.values()):
        return f"{name} trains LoRA biases (lora_bias), which llama.cpp's adapters do not hold"
    if lay.full_weights:
        key = next(iter(lay.full_weights))
        return f"{name} saves full weights ({key}: modules_to_save or resized embeddings), not LoRA factors"
    if lay.trainable_tokens or config.trainable_token_indices:
        return f"{name} trains token embeddings (trainable_token_indices)"
    if lay.unknown:
        return f"{name} has tensors that are not LoRA factors ({lay.unknown[0]})"
    for module, entry in lay.lora.items():
        if entry.kind == "embedding":
            return f"{name} adapts the embedding {module}"
        if module.endswith("lm_head") and tied_embeddings(arch.config):
            return f"{name} adapts lm_head, which this base ties to the embedding"
    return None


def write_adapter_gguf(
    out: Path,
    arch: Architecture,
    adapter_folder: Path,
    type_name: str = "f16",
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> dict:
    """Write the adapter-only GGUF; returns ``{"alpha", "rank", "modules", "folded"}``."""
    import gguf
    import torch

    cancel = cancel or CancelToken()
    if reason := type_refusal(type_name):
        raise UserError(reason, TYPE_HINT)
    reason = adapter_refusal(adapter_folder, arch)
    if reason:
        raise UserError(reason, "export a merged GGUF instead (--format gguf)")
    config = adapter_files.read_adapter_config(adapter_folder)
    tensors = adapter_files.load_tensors(adapter_folder)
    adapter_files.check_finite(tensors, adapter_folder)
    lay = adapter_files.layout(tensors)
    alpha = float(config.lora_alpha)
    wanted = ggml_type(type_name)
    pieces: list[tuple[str, np.ndarray, Any]] = []
    folded = 0
    for module, entry in sorted(lay.lora.items()):
        assert entry.a and entry.b  # layout() pairs them; adapter_refusal saw no other kind
        a = tensors[entry.a].to(torch.float32)
        b = tensors[entry.b].to(torch.float32)
        hf_name = _checkpoint_name(module)
        name = arch.gguf_name_of(hf_name)
        if name is None:
            raise UserError(f"the adapter adapts {module}, which llama.cpp does not load", "")
        rank = a.shape[0]
        factor = config.scaling_for(module) / (alpha / rank)  # what llama.cpp's alpha / r misses
        if abs(factor - 1.0) > 1e-12:
            b = b * factor
            folded += 1
        if (heads := arch.permutation(hf_name)) is not None:
            b = permute_rows(b, heads)
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            array = data.contiguous().numpy()
            qtype = tensor_type(name + ".weight", tuple(array.shape), wanted)  # the base weight's rule
            pieces.append((name + suffix, array, qtype))
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(adapter_folder).name)
    writer.add_string("general.quantized_by", f"LoRA Studio {__version__}")
    encoded = [(n, quantise(arr, q), q) for n, arr, q in pieces]
    for n, data, q in encoded:
        writer.add_tensor(n, data, raw_dtype=q)
    try:
        writer.write_header_to_file(path=Path(out))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (_, data, _) in enumerate(encoded):
            cancel.raise_if_cancelled()
            report(Progress(i, len(encoded), f"{WRITING_STAGE} {i + 1}/{len(encoded)}", "tensors"))
            writer.write_tensor_data(data)
    finally:
        writer.close()
    report(Progress(len(encoded), len(encoded), f"{WRITING_STAGE} {len(encoded)}/{len(encoded)}", "tensors"))
    return {"alpha": alpha, "rank": config.r, "modules": len(lay.lora), "folded": folded}


def _checkpoint_name(module: str) -> str:
    """The base checkpoint's weight name of an adapted module (PEFT keys start at the model, like the checkpoint)."""
    return f"{module}.weight"
