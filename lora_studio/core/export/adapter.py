"""Adapter-only GGUF through llama.cpp's own ``convert_lora_to_gguf.py``, for ``llama-server --lora``.

The pinned llama.cpp's LoRA converter (``converter.converter_script``) writes ``general.type = adapter``,
``adapter.lora.alpha`` and, per adapted weight, ``<name>.lora_a`` / ``<name>.lora_b`` with the architecture's own
transforms (its ``modify_tensors``: rotary permutations, fused projections). llama.cpp applies ``alpha / r`` with r
read from each tensor; where PEFT's scaling differs from that (rsLoRA's ``alpha / sqrt(r)``, ``rank_pattern``,
``alpha_pattern``) the difference is folded into B in a copy of the adapter the converter reads, so any scaling PEFT
allows loads as PEFT applies it. The converter is given the base's configuration alone (it reads no weight), so the
base may be a Hugging Face folder or a GGUF file. The file works on any GGUF of the same base, quantised ones too.

What llama.cpp cannot hold is refused with the reason before anything is written: DoRA (magnitudes llama.cpp does
not apply), LoRA biases, modules_to_save / saved embeddings (full weights, not factors), trainable tokens, LoRA on the
embedding or on a tied lm_head.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError
from lora_studio.core.export.converter import converter_refusals, converter_script
from lora_studio.core.io.paths import regular_file
from lora_studio.core.model.config import tied_embeddings
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")


TYPE_HINT = "quantise the base GGUF instead: the adapter is small"


def type_refusal(type_name: str) -> str | None:
    """Why an adapter-only GGUF cannot have this type, or None."""
    if type_name in ADAPTER_TYPES:
        return None
    return f"an adapter-only GGUF is written as {', '.join(ADAPTER_TYPES)}, not {type_name}"


def adapter_refusal(adapter_folder: Path, base_config: dict) -> str | None:
    """Why this adapter cannot be an adapter-only GGUF, or None."""
    if reason := adapter_files.factors_refusal(adapter_folder, "llama.cpp", dora=False):
        return reason
    lay = adapter_files.layout(adapter_files.tensor_shapes(adapter_folder))
    name = Path(adapter_folder).name
    for module, entry in lay.lora.items():
        if entry.kind == "embedding":
            return f"{name} adapts the embedding {module}"
        if module.endswith("lm_head") and tied_embeddings(base_config):
            return f"{name} adapts lm_head, which this base ties to the embedding"
    return None


CONVERTING_STAGE = "converting the adapter (llama.cpp's convert_lora_to_gguf.py)"
PEFT_PREFIX = "base_model.model."
_ARGV_LOCK = threading.Lock()  # the converter script reads its arguments from sys.argv


def write_adapter_gguf(
    out: Path,
    base_config: dict,
    adapter_folder: Path,
    type_name: str = "f16",
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> dict:
    """Write the adapter-only GGUF with llama.cpp's LoRA converter; returns ``{"alpha", "rank", "modules",
    "folded"}``. ``base_config``: the base's Hugging Face configuration (with ``architectures``)."""
    cancel = cancel or CancelToken()
    if reason := type_refusal(type_name):
        raise UserError(reason, TYPE_HINT)
    reason = adapter_refusal(adapter_folder, base_config)
    if reason:
        raise UserError(reason, "export a merged GGUF instead (--format gguf)")
    script = converter_script("convert_lora_to_gguf.py")
    out = Path(out)
    report(Progress(0, None, CONVERTING_STAGE))
    # the converter's inputs, beside the output: the base's configuration and the adapter with its scaling folded
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        base = Path(work) / "base"
        base.mkdir()
        (base / "config.json").write_text(json.dumps(base_config), encoding="utf-8")
        folded = _folded_adapter(adapter_folder, Path(work) / Path(adapter_folder).name)
        cancel.raise_if_cancelled()
        argv = [str(script), "--outfile", str(out), "--outtype", type_name, "--base", str(base), str(folded["folder"])]
        with _ARGV_LOCK, converter_refusals(Path(adapter_folder)), _as_a_library():
            saved, sys.argv = sys.argv, argv
            try:
                runpy.run_path(str(script), run_name="__main__")
            finally:
                sys.argv = saved
    cancel.raise_if_cancelled()
    report(Progress(1, 1, CONVERTING_STAGE))
    return {key: value for key, value in folded.items() if key != "folder"}


@contextmanager
def _as_a_library() -> Iterator[None]:
    """The script run in this process without a script's side effects: its ``logging.basicConfig`` finds a handler
    (a null one, if the process has none), and it takes the installed gguf (that very gguf-py)."""
    root = logging.getLogger()
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    os.environ["NO_LOCAL_GGUF"] = "1"
    try:
        yield
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)


def _folded_adapter(adapter_folder: Path, into: Path) -> dict:
    """A copy of the adapter in ``into`` whose B factors carry what llama.cpp's ``alpha / r`` misses of PEFT's
    scaling (rsLoRA, rank_pattern, alpha_pattern), in float32."""
    import torch
    from safetensors.torch import save_file

    config = adapter_files.read_adapter_config(adapter_folder)
    tensors = adapter_files.load_tensors(adapter_folder)
    adapter_files.check_finite(tensors, adapter_folder)
    lay = adapter_files.layout(tensors)
    alpha = float(config.lora_alpha)
    out: dict[str, torch.Tensor] = {}
    folded = 0
    for module, entry in sorted(lay.lora.items()):
        assert entry.a and entry.b  # layout() pairs them; adapter_refusal saw no other kind
        a = tensors[entry.a].to(torch.float32)
        b = tensors[entry.b].to(torch.float32)
        factor = config.scaling_for(module) / (alpha / a.shape[0])
        if abs(factor - 1.0) > 1e-12:
            b = b * factor
            folded += 1
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    into.mkdir()
    source_config = regular_file(Path(adapter_folder) / adapter_files.CONFIG_NAME, "adapter config")
    (into / adapter_files.CONFIG_NAME).write_bytes(source_config.read_bytes())
    save_file(out, str(into / "adapter_model.safetensors"))
    return {"folder": into, "alpha": alpha, "rank": config.r, "modules": len(lay.lora), "folded": folded}
