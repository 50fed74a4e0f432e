"""A base model's config.json: read with one error policy, and the settings read from it in more than one place.

Every reader of a model's config.json goes through :func:`read_config_file`: a file that
cannot be read, is not valid JSON or is not a JSON object is a UserError naming the file; a
missing file is a UserError too unless the caller says it can do without (``missing_ok``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.errors import UserError, first_and_more
from lora_studio.core.io.paths import inside, regular_file
from lora_studio.core.model.file_reads import FileReads, file_key
from lora_studio.core.model.sources import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CONFIG_NAME = "config.json"


def read_config_file(folder: Path, *, missing_ok: bool = False) -> dict:
    """``folder/config.json`` as a dict; ``{}`` for a missing file when ``missing_ok``."""
    path = regular_file(inside(Path(folder), CONFIG_NAME), "model config")
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        if missing_ok:
            return {}
        raise UserError(f"{Path(folder)} has no {CONFIG_NAME}", "pick a complete model folder") from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", "check that the file is readable") from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not valid JSON ({_short(exc)})", "the model folder is damaged") from exc
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a JSON object", "the model folder is damaged")
    check_sizes(doc, path)
    for nested in ("text_config", "llm_config"):
        if isinstance(doc.get(nested), dict):
            check_sizes(doc[nested], path)
    return doc


# the sizes a config.json declares, and the largest any real model has (with room): a size outside is refused before
# anything is built from it (a list of a billion layers, a negative hidden size)
SIZE_LIMITS = {
    "vocab_size": 16_000_000,
    "hidden_size": 1_000_000,
    "n_embd": 1_000_000,
    "d_model": 1_000_000,
    "intermediate_size": 4_000_000,
    "num_hidden_layers": 4096,
    "n_layer": 4096,
    "num_layers": 4096,
    "num_attention_heads": 65536,
    "num_key_value_heads": 65536,
    "n_head": 65536,
    "head_dim": 65536,
    "max_position_embeddings": 1 << 28,
    "n_positions": 1 << 28,
}


def check_sizes(config: dict, path: Path) -> None:
    """Every size in SIZE_LIMITS that ``config`` declares is a whole number from 1 to its limit."""
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise UserError(
                f"{path}: {key} is {str(value)[:40]}, not a whole number from 1 to {limit:,}",
                "the model folder is damaged, or its config.json belongs to no real model",
            )


def read_config(source: ModelSource, *, missing_ok: bool = False) -> dict:
    """A source's config.json as a dict; ``{}`` for a GGUF source (its metadata is in the file, read elsewhere)."""
    if source.gguf_file:
        return {}
    return read_config_file(source.path, missing_ok=missing_ok)


def gguf_config(source: ModelSource) -> dict:
    """A GGUF base's configuration as transformers reads it from the file's metadata (the Hugging Face config.json
    it stands for), as a dict; a damaged or foreign file is one UserError. Remembered per file as it is (size and
    time): reading the metadata parses every token of the vocabulary in Python, ~4 s for a 262k-token one."""
    try:
        key = file_key(source.path / str(source.gguf_file))
    except OSError as exc:
        raise UserError(f"{source.label}: {_short(exc)}", "choose the GGUF file again") from exc
    return dict(_GGUF_CONFIGS.get(key, lambda: _read_gguf_config(source)))


_GGUF_CONFIGS: FileReads[dict] = FileReads("gguf config")


def gguf_pretrained_config(source: ModelSource) -> PreTrainedConfig:
    """:func:`gguf_config` as the config object transformers would make from the file (equal, field for field),
    for ``from_pretrained(..., config=)``: a load then does not parse the file's metadata a second time."""
    from transformers import CONFIG_MAPPING

    config = gguf_config(source)
    try:
        return CONFIG_MAPPING[config["model_type"]].from_dict(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(
            f"{source.label}: transformers cannot read this GGUF's configuration ({_short(exc)})",
            "open its Hugging Face model folder instead",
        ) from exc


def _read_gguf_config(source: ModelSource) -> dict:
    from transformers import AutoConfig

    from lora_studio.core._compat.gguf_reader import fast_gguf_reads

    try:
        with fast_gguf_reads():
            return AutoConfig.from_pretrained(str(source.path), gguf_file=source.gguf_file).to_dict()
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(
            f"{source.label}: transformers cannot read this GGUF's configuration ({_short(exc)})",
            "open its Hugging Face model folder instead",
        ) from exc


def tied_embeddings(config: dict) -> bool:
    """Whether the output embedding (lm_head) shares the input embedding's weights.

    As transformers decides it: the model that owns lm_head ties it by its own config's
    ``tie_word_embeddings``, the top-level one; a composite model's ``text_config`` is asked only
    when the top level does not say, and the default, as in ``PretrainedConfig``, is tied.
    """
    text = config.get("text_config")
    if not isinstance(text, dict):
        text = {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def _short(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def check_declared_layers(config: dict, tensor_names: Iterable[str], label: str) -> None:
    """Refuse a checkpoint holding fewer decoder layers than its config declares, or a layer lacking weights the
    others have: transformers would initialise what is missing at random (from file headers, no model code)."""
    declared = next((config[k] for k in _LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    parts: dict[int, set[str]] = {}
    for name in tensor_names:
        if m := _LAYER_INDEX.search(name):
            parts.setdefault(int(m.group(1)), set()).add(name[m.end() :])
    if declared is None or not parts:
        return
    every = set().union(*parts.values())
    for layer in sorted(parts):
        lacking = sorted(every - parts[layer])
        if lacking:
            raise UserError(
                f"{label}: layer {layer} of the checkpoint lacks {first_and_more(lacking)}, "
                "which the other layers have; it would be random",
                "the checkpoint is incomplete; download or convert it again",
            )
    missing = sorted(set(range(declared)) - set(parts))
    if missing:
        raise UserError(
            f"{label}: config.json declares {declared} layers but the checkpoint has no weights for "
            f"{len(missing)} of them (from layer {missing[0]}); they would be random",
            "the checkpoint is incomplete, or config.json belongs to another model",
        )


def with_top_level_rope_theta(config: dict) -> dict:
    """``config`` with ``rope_theta`` at the top as well, when transformers 5 keeps it only inside
    ``rope_parameters``: mlx-lm (0.32) and other runtimes read the top-level key and would otherwise run the model
    with their own default rotary base. transformers reads either."""
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and isinstance(rope.get("rope_theta"), (int, float)):
        return {**config, "rope_theta": rope["rope_theta"]}
    return config
