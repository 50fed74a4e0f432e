"""What a merged folder holds besides its weights: config files, the tokenizer, and the provenance in its model card.

Each writer works in the temporary folder the merge fills (core/io/atomic.py), so a
failure leaves no half-written output.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio import __version__
from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError
from lora_studio.core.io.paths import inside, regular_file
from lora_studio.core.io.safetensors_format import read_headers
from lora_studio.core.merge import model_card
from lora_studio.core.merge.plan import TOKENIZER_PATTERNS, AdapterSpec, MergeOptions, base_config
from lora_studio.core.model import identity
from lora_studio.core.model.config import read_config_file, tied_embeddings, with_top_level_rope_theta
from lora_studio.core.model.identity import base_fingerprint, base_license
from lora_studio.core.model.sources import ModelSource

if TYPE_CHECKING:
    from lora_studio.core.session import Session


def _clean_config(cfg: dict, dtype: str) -> dict:
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)  # the merged weights are plain floats
    cfg.pop("torch_dtype", None)
    # where the base was loaded from (e.g. a path into the install): transformers never saves it either;
    # the base's hub name goes into the model card's front matter
    cfg.pop("_name_or_path", None)
    cfg["dtype"] = dtype
    return with_top_level_rope_theta(cfg)


def hub_name(source: ModelSource, adapters: Sequence[AdapterSpec] = ()) -> str | None:
    """The base's Hugging Face Hub id when known (see :func:`lora_studio.core.model.identity.hub_id`)."""
    named = []
    for a in adapters:
        try:
            named.append(adapter_files.read_adapter_config(a.path).base_model_name_or_path or "")
        except UserError:
            named.append("")
    return identity.hub_id(source, named)


def write_config_from_folder(source: ModelSource, tmp: Path, dtype: str) -> None:
    """config.json (cleaned: plain floats in ``dtype``) and generation_config.json, from the base folder's files."""
    cfg = base_config(source)
    if not cfg:
        raise UserError(f"{source.label} has no config.json", "the model folder is incomplete")
    (tmp / "config.json").write_text(json.dumps(_clean_config(cfg, dtype), indent=2, sort_keys=True) + "\n", "utf-8")
    gen = source.path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, tmp / gen.name)  # verbatim: keeps the full EOS list


def write_config_from_model(model: Any, source: ModelSource, tmp: Path, dtype: str) -> None:
    """config.json from the loaded model's config (cleaned), untied when the written shards hold a separate head."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):
        # as transformers' save_pretrained sets it; a config read from a GGUF file has none, and llama.cpp's
        # convert_hf_to_gguf.py (and AutoModel) find the model's class by it
        config.architectures = [type(model).__name__]
    config.save_pretrained(str(tmp))
    path = tmp / "config.json"
    cfg = _clean_config(read_config_file(tmp), dtype)
    if tied_embeddings(cfg) and _embeddings_saved_apart(tmp, model):
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


def _embeddings_saved_apart(tmp: Path, model: Any) -> bool:
    """Whether the written shards hold both the input embedding and a separate output embedding."""
    names = {n for h in read_headers(tmp) for n in h.tensors}
    modules = {id(m): n for n, m in model.named_modules()}
    found = []
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        name = modules.get(id(emb)) if emb is not None else None
        found.append(name is not None and f"{name}.weight" in names)
    return all(found)


def copy_tokenizer(source: ModelSource, tmp: Path, session: Session | None) -> None:
    """The tokenizer files: the base's, or the one a session uses when it was resized or came from a GGUF file."""
    if (
        session is not None
        and session.tokenizer is not None
        and (session.tokenizer_source is not None or source.gguf_file)
    ):
        session.tokenizer.save_pretrained(str(tmp))  # a resized vocabulary or a GGUF tokenizer: save what is in use
        return
    copied = 0
    if not source.gguf_file:
        for pattern in TOKENIZER_PATTERNS:
            for p in source.path.glob(pattern):
                if p.is_file() and not (tmp / p.name).exists():
                    # a link out of the base folder is refused, not followed into the output
                    regular_file(inside(source.path, p.name, "tokenizer file"), "tokenizer file")
                    shutil.copyfile(p, tmp / p.name)
                    copied += 1
    if not copied:
        from lora_studio.core.model.loading import load_tokenizer

        tokenizer = (
            session.tokenizer if session is not None and session.tokenizer is not None else load_tokenizer(source)
        )
        tokenizer.save_pretrained(str(tmp))
    stray = tmp / "adapter_config.json"
    if stray.exists():
        stray.unlink()


def provenance(
    source: ModelSource, adapters: Sequence[AdapterSpec], options: MergeOptions, engine: str, dtype: str
) -> dict:
    """Where the merge came from (base, adapters with their hashes, options), for the model card."""
    base = {
        "label": source.label,
        "path": str(source.file),
        "kind": source.kind,
        "hub_id": hub_name(source, adapters),
        "license": base_license(source),
        **base_fingerprint(source),
    }
    items = []
    for a in adapters:
        cfg = adapter_files.read_adapter_config(a.path)
        wf = adapter_files.weights_file(a.path)
        items.append(
            {
                "name": a.name,
                "path": str(Path(a.path).absolute()),
                "weight": a.weight,
                "r": cfg.r,
                "lora_alpha": cfg.lora_alpha,
                "use_rslora": cfg.use_rslora,
                "use_dora": cfg.use_dora,
                "target_modules": cfg.target_modules,
                "file": wf.name,
                "sha256": model_card.file_sha256(wf),
            }
        )
    return {
        "tool": "lora-studio",
        "tool_version": __version__,
        "base": base,
        "adapters": items,
        "combination": options.combination,
        "density": options.density,
        "dtype": dtype,
        "engine": engine,
        "safe_merge": options.safe_merge,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_model_card(tmp: Path, record: dict, out: Path) -> None:
    """README.md from the provenance ``record`` (with its verification, if any) of the folder that becomes ``out``."""
    record["output"] = str(Path(out).absolute())
    # paths need not be UTF-8 on Linux: escape what cannot be written rather than fail at the very end
    (tmp / "README.md").write_text(model_card.render(record), "utf-8", errors="backslashreplace")
