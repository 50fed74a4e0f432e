"""What an adapter does, from its config and its small factors alone.

The scaled update of a LoRA module is ΔW = s·B·A with B (out×r) and A (r×in).
With QR factorisations Aᵀ = Q_a R_a and B = Q_b R_b, ΔW = s·Q_b (R_b R_aᵀ) Q_aᵀ,
and Q_b, Q_a have orthonormal columns, so ΔW has the singular values of the r×r
matrix s·R_b R_aᵀ. Norms and spectra cost O((in+out)·r²) and never build ΔW.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.files import AdapterConfig, LoraModuleKeys, ModuleKind

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModuleDelta:
    module: str
    kind: ModuleKind
    in_features: int
    out_features: int
    r: int
    scaling: float
    delta_norm: float  # Frobenius norm of s·B·A
    singular_values: list[float]


@dataclass(frozen=True)
class AdapterInspection:
    name: str
    path: str
    peft_type: str
    r: int
    lora_alpha: float
    scaling: float
    use_rslora: bool
    use_dora: bool
    init_lora_weights: str
    target_modules: object
    modules_to_save: list[str]
    trainable_token_indices: object
    params: int
    percent_of_base: float | None
    base_model_name_or_path: str | None
    peft_version: str | None
    weights_file: str
    weights_bytes: int
    modules: list[ModuleDelta] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    init_summary: str = ""  # a few words for the inspector: "OLoRA, converted", "default"

    def to_json(self) -> dict:
        return asdict(self)


def delta_spectrum(a: torch.Tensor, b: torch.Tensor, scaling: float) -> list[float]:
    """Singular values of scaling·B·A (largest first) from the factors, in float64."""
    import torch

    a64 = a.detach().to(torch.float64)
    b64 = b.detach().to(torch.float64)
    _, r_a = torch.linalg.qr(a64.T, mode="reduced")  # Aᵀ = Q_a R_a
    _, r_b = torch.linalg.qr(b64, mode="reduced")  # B = Q_b R_b
    core = scaling * (r_b @ r_a.T)
    return [float(s) for s in torch.linalg.svdvals(core)]


def module_delta(keys: LoraModuleKeys, tensors: dict, config: AdapterConfig) -> ModuleDelta | None:
    if keys.a is None or keys.b is None:
        return None
    a, b = tensors[keys.a], tensors[keys.b]
    # Linear: A is r×in, B is out×r. Embedding: A is r×num_embeddings, B is dim×r and
    # ΔW = (B A)ᵀ, which has the same spectrum.
    in_f, out_f = a.shape[1], b.shape[0]
    scaling = config.scaling_for(keys.module)
    sv = delta_spectrum(a, b, scaling)
    norm = sum(s * s for s in sv) ** 0.5
    return ModuleDelta(keys.module, keys.kind, int(in_f), int(out_f), int(a.shape[0]), scaling, norm, sv)


def inspect_adapter(folder: Path, *, name: str | None = None, base_params: int | None = None) -> AdapterInspection:
    folder = adapter_files.check_adapter_folder(folder)
    config = adapter_files.read_adapter_config(folder)
    tensors = adapter_files.load_tensors(folder)
    adapter_files.check_finite(tensors, folder)
    lay = adapter_files.layout(tensors)
    modules = [d for d in (module_delta(k, tensors, config) for k in lay.lora.values()) if d is not None]
    modules.sort(key=lambda d: natural_key(d.module))
    params = sum(int(t.numel()) for t in tensors.values())
    wfile = adapter_files.weights_file(folder)
    warnings = list(config.warnings)
    if lay.unknown:
        warnings.append(f"{len(lay.unknown)} tensors of unknown role: {', '.join(lay.unknown[:3])}")
    return AdapterInspection(
        name=name or folder.name,
        path=str(folder),
        peft_type=config.peft_type,
        r=config.r,
        lora_alpha=config.lora_alpha,
        scaling=config.scaling,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=config.init_method,
        init_summary=init_summary(config),
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        trainable_token_indices=config.trainable_token_indices,
        params=params,
        percent_of_base=(100.0 * params / base_params) if base_params else None,
        base_model_name_or_path=config.base_model_name_or_path,
        peft_version=config.peft_version,
        weights_file=wfile.name,
        weights_bytes=wfile.stat().st_size,
        modules=modules,
        warnings=warnings,
    )


# PEFT's init_lora_weights values, as their papers spell them
_INIT_NAMES = {
    "default": "default",
    "gaussian": "Gaussian",
    "olora": "OLoRA",
    "pissa": "PiSSA",
    "corda": "CorDA",
    "eva": "EVA",
    "loftq": "LoftQ",
    "orthogonal": "orthogonal",
    "lora_ga": "LoRA-GA",
}


def init_summary(config: AdapterConfig) -> str:
    """How the adapter was initialised, in a few words: "OLoRA, converted" (converted to plain LoRA on save).

    The sidecar (lora_studio.json) records the init that was actually used: PEFT writes
    ``init_lora_weights: true`` when it converts an OLoRA/PiSSA adapter to plain LoRA.
    """
    value = config.recorded_init if config.recorded_init else config.init_lora_weights
    if value is True:
        name = "default"
    elif value is False:
        name = "random"
    else:
        text = str(value)
        key = text.lower()
        if key.startswith("pissa_niter_"):
            name = f"PiSSA (fast SVD, {key.removeprefix('pissa_niter_')} iterations)"
        else:
            name = _INIT_NAMES.get(key, text)
    return f"{name}, converted" if config.converted_to_lora else name


def natural_key(text: str) -> list[int | str]:
    """Sort key ordering "layers.2" before "layers.10"."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def per_layer_norms(modules: Sequence[ModuleDelta]) -> tuple[list[str], list[float]]:
    """‖ΔW‖ per transformer layer (root of the sum of squares over its modules); other modules by their last name.

    Layers come first, in index order, labelled by their index; modules outside the numbered layers (an
    embedding, the head) follow, labelled by the last part of their name.
    """
    layers: dict[int, float] = {}
    others: dict[str, float] = {}
    for m in modules:
        match = _LAYER_INDEX.search(m.module)
        if match:
            layer = int(match.group(1))
            layers[layer] = layers.get(layer, 0.0) + m.delta_norm**2
        else:
            short = m.module.rsplit(".", 1)[-1]
            others[short] = others.get(short, 0.0) + m.delta_norm**2
    labels = [str(i) for i in sorted(layers)] + list(others)
    values = [layers[i] ** 0.5 for i in sorted(layers)] + [v**0.5 for v in others.values()]
    return labels, values
