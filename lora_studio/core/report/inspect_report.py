"""Inspecting a base and adapters together from file headers: no weights of the base are loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_studio.core.adapters import compatibility
from lora_studio.core.adapters.inspection import AdapterInspection, inspect_adapter
from lora_studio.core.model import estimate
from lora_studio.core.model.sources import ModelSource


@dataclass
class InspectReport:
    source: ModelSource
    estimate: estimate.MemoryEstimate
    adapters: list[AdapterInspection] = field(default_factory=list)
    quantize: str | None = None  # the estimate's quantisation on load (None: the checkpoint's own)

    def to_json(self) -> dict:
        fp = self.estimate.footprint
        return {
            "base": {
                "path": str(self.source.file),
                "label": self.source.label,
                "kind": self.source.kind,
                "architecture": fp.architecture,
                "model_type": fp.model_type,
                "params": fp.params,
                "dtype": self.estimate.dtype,
                "quantize": self.quantize,
                "checkpoint_dtype": fp.checkpoint_dtype,
                "tied_embeddings": fp.tied_embeddings,
                "estimated_bytes": self.estimate.needed_bytes,
                "weights_bytes": self.estimate.weights_bytes,
                "device_map": self.estimate.device_map,
                "verdict": self.estimate.verdict,
                "where": self.estimate.where,
                "explanation": self.estimate.explanation,
            },
            "adapters": [a.to_json() for a in self.adapters],
        }


def base_weight_shapes(source: ModelSource) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a base without loading its weights."""
    if not source.gguf_file:
        return compatibility.weight_shapes_from_headers(source.path)
    # GGUF tensor names differ from transformers'; build the model on the meta device instead.
    import torch
    from transformers import AutoModelForCausalLM

    from lora_studio.core.model.config import gguf_pretrained_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gguf_pretrained_config(source))
    return compatibility.weight_shapes_from_model(model)


def inspect_base_and_adapters(
    source: ModelSource,
    adapters: list[tuple[str, Path]],
    *,
    dtype: str | None = None,
    device_map: str = "cpu",
    quantize: str | None = None,
) -> InspectReport:
    from lora_studio.core.model.config import read_config
    from lora_studio.core.model.quantize import check_quantize

    check_quantize(quantize, source, read_config(source, missing_ok=True))
    est = estimate.estimate(source, dtype, device_map, quantize=quantize)
    report = InspectReport(source, est, quantize=quantize)
    if not adapters:
        return report
    shapes = base_weight_shapes(source)
    identity = (source.label, str(source.path), source.repo_id or "")
    for name, path in adapters:
        compat = compatibility.check(
            path,
            shapes,
            base_label=source.label,
            base_identity=identity,
            architecture=est.footprint.architecture,
            model_type=est.footprint.model_type,
        )
        info = inspect_adapter(path, name=name, base_params=est.footprint.params)
        info.warnings.extend(w for w in compat.warnings if w not in info.warnings)
        report.adapters.append(info)
    return report
