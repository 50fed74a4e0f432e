"""Will this adapter fit this base? Decided from shapes, before anything is attached.

Base shapes come from safetensors headers (a folder not yet loaded) or from a
loaded model's parameters; adapter shapes from the adapter's header. A mismatch
names the module and both shapes; a different ``base_model_name_or_path`` is only
a warning, because folders get moved and renamed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError, first_and_more

if TYPE_CHECKING:
    import torch


class VocabularyMismatch(UserError):
    """The adapter was trained on a resized vocabulary (added tokens): the base can be resized to match."""

    def __init__(
        self, message: str, hint: str, *, adapter_vocab: int, base_vocab: int, adapter_has_tokenizer: bool
    ) -> None:
        super().__init__(message, hint)
        self.adapter_vocab = adapter_vocab
        self.base_vocab = base_vocab
        self.adapter_has_tokenizer = adapter_has_tokenizer


# transformers' models whose blocks use Conv1D (weights stored in × out) instead of nn.Linear (out × in)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def stores_in_by_out(module: str, base_shape: tuple[int, ...], in_f: int, out_f: int, model_type: str | None) -> bool:
    """Whether the base layer stores its weight in × out (transformers' Conv1D) rather than out × in (nn.Linear).

    PEFT decides ``fan_in_fan_out`` per layer from the layer's class, whatever adapter_config.json says (with a
    warning). Without the class the shapes decide; a square weight is Conv1D in the blocks of a Conv1D model."""
    shape = tuple(base_shape)
    if shape == (in_f, out_f) and shape != (out_f, in_f):
        return True
    if shape == (out_f, in_f) and shape != (in_f, out_f):
        return False
    return model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] != "lm_head"


@dataclass(frozen=True)
class Compatibility:
    adapter: str
    modules: int
    warnings: list[str] = field(default_factory=list)


def weight_shapes_from_headers(folder: Path) -> dict[str, tuple[int, ...]]:
    from lora_studio.core.io.safetensors_format import read_headers

    return {name: info.shape for h in read_headers(folder) for name, info in h.tensors.items()}


def weight_shapes_from_model(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a loaded model, with PEFT wrapping removed from the names."""
    shapes = {}
    # a quantised weight (bitsandbytes' 4-bit codes are packed two to a byte) has its layer's shape in its module
    logical = {
        f"{name}.weight": (int(m.out_features), int(m.in_features))
        for name, m in model.named_modules()
        if type(m).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(m, "in_features")
    }
    for name, p in model.named_parameters():
        shape = logical.get(name, tuple(p.shape))
        clean = adapter_files.strip_prefix(name).replace(".base_layer.", ".")
        if (
            ".lora_" in clean
            or ".modules_to_save." in clean
            or ".original_module." in clean
            or "token_adapter" in clean
        ):
            continue
        shapes[clean] = shape
    if "lm_head.weight" not in shapes:
        emb = _embedding_shape(shapes)
        if emb is not None:
            shapes["lm_head.weight"] = emb  # tied: the head is the embedding
    return shapes


def _embedding_shape(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    for key in ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight"):
        if key in shapes:
            return shapes[key]
    return None


def _fmt(in_f: int, out_f: int) -> str:
    return f"in={in_f},out={out_f}"


def check(
    adapter_folder: Path,
    base_shapes: Mapping[str, tuple[int, ...]],
    *,
    base_label: str = "the base",
    base_identity: tuple[str, ...] = (),
    architecture: str = "",
    model_type: str | None = None,
) -> Compatibility:
    """Raise UserError if the adapter cannot apply to a base with ``base_shapes``; else return warnings.

    ``model_type``: the base's config.json ``model_type``, which says how a square weight is stored."""
    folder = adapter_files.check_adapter_folder(adapter_folder)
    config = adapter_files.read_adapter_config(folder)
    shapes = adapter_files.tensor_shapes(folder)
    lay = adapter_files.layout(shapes)
    base_shapes = dict(base_shapes)
    embedding = _embedding_shape(base_shapes)
    if "lm_head.weight" not in base_shapes and embedding is not None:
        base_shapes["lm_head.weight"] = embedding
    warnings = list(config.warnings)
    # where the adapter says which base it was trained on, the way out names it
    pick_base = (
        f"pick the base it was trained on: {config.base_model_name_or_path}"
        if config.base_model_name_or_path
        else "pick the base the adapter was trained on"
    )

    missing = [m for m in lay.lora if f"{m}.weight" not in base_shapes]
    if missing:
        arch = f" ({architecture})" if architecture else ""
        if len(missing) == len(lay.lora):
            raise UserError(
                f"{folder.name} does not fit {base_label}{arch}: it adapts {missing[0]}, which this base does not have",
                f"the adapter was made for another architecture; {pick_base}",
            )
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            f"{folder.name} adapts modules {base_label} does not have: {listed}",
            f"these weights would be ignored; {pick_base}",
        )

    _check_vocabulary(folder, shapes, lay, base_shapes, base_label)
    flipped: list[str] = []  # modules whose layer type contradicts the config's fan_in_fan_out

    for module, keys in lay.lora.items():
        if keys.a is None or keys.b is None:
            raise UserError(
                f"{folder.name}: {module} has lora_{'A' if keys.a is None else 'B'} missing",
                "the adapter file is incomplete",
            )
        a_shape, b_shape = shapes[keys.a], shapes[keys.b]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise UserError(
                f"{folder.name}: {module} has inconsistent factors A{list(a_shape)} B{list(b_shape)}",
                "the adapter file is damaged",
            )
        rank = config.rank_for(module)
        if a_shape[0] != rank:
            # PEFT builds the layer with the config's rank and then cannot load the tensors; a merge would scale
            # the update by the wrong alpha / r
            raise UserError(
                f"{folder.name}: {module} has rank {a_shape[0]} in its tensors but rank {rank} in "
                f"adapter_config.json ({'rank_pattern' if rank != config.r else 'r'})",
                "the config does not belong to these weights; re-save the adapter",
            )
        base = base_shapes[f"{module}.weight"]
        if len(base) != 2:
            raise UserError(
                f"{folder.name}: {module} is not a 2-D layer in {base_label} (weight shape {list(base)})",
                "LoRA Studio adapts Linear, Conv1D and Embedding layers",
            )
        want_in, want_out = a_shape[1], b_shape[0]
        if keys.kind == "embedding":
            have_in, have_out = base  # Embedding weight: num_embeddings × dim
        else:
            conv1d = stores_in_by_out(module, base, want_in, want_out, model_type)
            have_in, have_out = base if conv1d else (base[1], base[0])  # GPT-2 Conv1D stores in × out
            if conv1d != config.fan_in_fan_out:
                flipped.append(module)
        if (want_in, want_out) != (have_in, have_out):
            raise UserError(
                f"{module}: adapter expects {_fmt(want_in, want_out)}, base has {_fmt(have_in, have_out)}",
                f"{folder.name} was trained on a different base; {pick_base}",
            )
        if keys.magnitude is not None:
            mag = shapes[keys.magnitude]
            if mag and mag[-1] != have_out and mag[0] != have_out:
                raise UserError(
                    f"{module}: DoRA magnitude has {list(mag)}, base out={have_out}",
                    f"the adapter was trained on a different base; {pick_base}",
                )

    if flipped:
        kind = "Conv1D" if not config.fan_in_fan_out else "nn.Linear"
        warnings.append(
            f"adapter_config.json says fan_in_fan_out={str(config.fan_in_fan_out).lower()}, "
            f"but {first_and_more(flipped)} is a {kind} layer: "
            "applied per layer as PEFT does"
        )

    for param, key in lay.full_weights.items():
        if param not in base_shapes:
            raise UserError(
                f"{folder.name} replaces {param}, which {base_label} does not have",
                pick_base,
            )
        if tuple(shapes[key]) != tuple(base_shapes[param]):
            raise UserError(
                f"{param}: adapter stores shape {list(shapes[key])}, base has {list(base_shapes[param])}",
                "the adapter was trained with a resized vocabulary or on another base; "
                "resize the base's embeddings to the adapter's tokenizer first",
            )
    declared = set(config.modules_to_save or ())
    undeclared = sorted(p for p in lay.full_weights if p.rsplit(".", 2)[-2] not in declared)
    if undeclared:
        # PEFT loads such a tensor over the base's own (a saved embedding layer does this): said, not silent
        warnings.append(
            f"{folder.name} holds whole weights for {first_and_more(undeclared)} that its config does not list in "
            "modules_to_save: attached or merged, they replace the base's"
        )

    for module, key in lay.trainable_tokens.items():
        base_shape = base_shapes.get(f"{module}.weight")
        if base_shape is None or shapes[key][-1] != base_shape[-1]:
            raise UserError(
                f"{folder.name}: trainable tokens of {module} do not fit {base_label}",
                pick_base,
            )

    trained_on = config.base_model_name_or_path
    if trained_on and base_identity and not _same_base(trained_on, base_identity):
        warnings.append(
            f"{folder.name} was trained on '{trained_on}'; the loaded base is '{base_identity[0]}' "
            "(shapes match, so it can be attached)"
        )
    return Compatibility(folder.name, len(lay.lora), warnings)


VOCAB_PARAMS = (
    "model.embed_tokens.weight",
    "lm_head.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
)


def _check_vocabulary(
    folder: Path,
    shapes: Mapping[str, tuple[int, ...]],
    lay: adapter_files.AdapterLayout,
    base_shapes: Mapping[str, tuple[int, ...]],
    base_label: str,
) -> None:
    """Spot an adapter trained with added tokens: its embedding rows outnumber the base's vocabulary."""
    base_vocab = _embedding_shape(base_shapes)
    if base_vocab is None:
        return
    vocab_sizes = []
    for param, key in lay.full_weights.items():
        if param in VOCAB_PARAMS and len(shapes[key]) == 2 and shapes[key][1] == base_vocab[1]:
            vocab_sizes.append(shapes[key][0])
    for module, keys in lay.lora.items():
        if keys.kind == "embedding" and keys.a is not None and f"{module}.weight" in VOCAB_PARAMS:
            vocab_sizes.append(shapes[keys.a][1])
    wrong = [v for v in vocab_sizes if v != base_vocab[0]]
    if not wrong:
        return
    has_tok = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    hint = (
        "the adapter folder has its own tokenizer with the added tokens: the window offers to resize the base to it "
        "when you attach the adapter, and `lora-studio merge` does it on its own"
        if has_tok and wrong[0] > base_vocab[0]
        else "pick the base and tokenizer the adapter was trained with"
    )
    raise VocabularyMismatch(
        f"{folder.name} was trained with a vocabulary of {wrong[0]} tokens; {base_label} has {base_vocab[0]}",
        hint,
        adapter_vocab=wrong[0],
        base_vocab=base_vocab[0],
        adapter_has_tokenizer=has_tok,
    )


def quantization_label(config: Mapping) -> str | None:
    """'bitsandbytes 4-bit' and the like when a model's config.json declares quantized weights, else None."""
    if not isinstance(config, Mapping):
        return None
    q = config.get("quantization_config")
    if not q and isinstance(config.get("text_config"), Mapping):
        q = config["text_config"].get("quantization_config")
    if not q:
        return None
    if not isinstance(q, Mapping):
        return "unknown method"
    method = str(
        q.get("quant_method")
        or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else "unknown method")
    )
    bits = (
        "4-bit"
        if q.get("load_in_4bit")
        else "8-bit"
        if q.get("load_in_8bit")
        else f"{q['bits']}-bit"
        if isinstance(q.get("bits"), int)
        else ""
    )
    return f"{method} {bits}".strip()


def _same_base(trained_on: str, identity: tuple[str, ...]) -> bool:
    want = trained_on.rstrip("/").split("/")[-1].lower()
    for ident in identity:
        if not ident:
            continue
        text = str(ident).rstrip("/")
        if text == trained_on or text.split("/")[-1].lower() == want:
            return True
    return False
