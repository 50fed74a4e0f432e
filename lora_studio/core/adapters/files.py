"""Reading a PEFT LoRA adapter folder: its config, its tensor layout and its weights.

Everything here treats the folder as untrusted: a broken config or weights file
gives a :class:`UserError` that says what is wrong, and ``.bin`` pickles are only
ever opened with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from lora_studio.core._compat.peft_config import unknown_config_keys
from lora_studio.core.errors import UserError
from lora_studio.core.io.paths import check_folder_contained, inside, regular_file
from lora_studio.core.io.safetensors_format import read_header
from lora_studio.core.io.tensor_values import largest_magnitude

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Written by LoRA Studio's training script beside an adapter. PEFT rewrites
# init_lora_weights to true when it converts an OLoRA/PiSSA adapter to plain LoRA
# on save, so the init that was actually used is recorded here.
SIDECAR_NAME = "lora_studio.json"


@dataclass(frozen=True)
class AdapterConfig:
    raw: dict
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    target_modules: Any  # list of names, or a regex string
    modules_to_save: list[str]
    trainable_token_indices: Any
    rank_pattern: dict
    alpha_pattern: dict
    init_lora_weights: Any
    base_model_name_or_path: str | None
    peft_version: str | None
    warnings: tuple[str, ...] = ()
    recorded_init: str | None = None  # from lora_studio.json, when present
    converted_to_lora: bool = False

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scaling_for(self, module: str) -> float:
        """PEFT's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA, per-module patterns applied."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    @property
    def init_method(self) -> str:
        if self.recorded_init and self.recorded_init != "default":
            if self.converted_to_lora:
                return f"{self.recorded_init} (converted to plain LoRA on save; applies to the unmodified base)"
            return self.recorded_init
        v = self.init_lora_weights
        if v is True:
            return "default (kaiming A, zero B)"
        if v is False:
            return "random (init_lora_weights=False)"
        return str(v)


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    # Same rule as PEFT: a pattern key matches the module name or a dotted suffix of it.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_type_names() -> set[str]:
    try:
        from peft import PeftType

        return {t.value for t in PeftType}
    except Exception:  # noqa: BLE001 - best effort: without PEFT's type list the check is skipped  # pragma: no cover
        return set()


def _is_default(value: object) -> bool:
    return value in (None, False, {}, [], "", 0)


def read_adapter_config(folder: Path) -> AdapterConfig:
    folder = check_adapter_folder(folder)
    path = regular_file(inside(folder, CONFIG_NAME), "adapter config")
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text", "the adapter folder is damaged; save the adapter again") from exc
    if not text.strip():
        raise UserError(f"{path} is empty", "the adapter folder is damaged; save the adapter again")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UserError(
            f"{path.name} in {folder.name} is not valid JSON ({why})",
            "fix or re-save the adapter",
        ) from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path.name} in {folder.name} is not a JSON object", "fix or re-save the adapter")
    peft_type = str(raw.get("peft_type", "")).upper()
    version = raw.get("peft_version")
    if peft_type != "LORA":
        if not peft_type and "lora_parameters" in raw:
            raise UserError(
                f"{folder.name} is an mlx-lm adapter, not a PEFT one",
                f"attach it (it is converted to PEFT), or convert it: lora-studio export BASE --adapter {folder} "
                "--format peft --out DIR",
            )
        if not peft_type:
            raise UserError(f"{path.name} in {folder.name} has no peft_type", "this does not look like a PEFT adapter")
        if peft_type in _peft_type_names():
            raise UserError(
                f"{folder.name} is a {peft_type} adapter; LoRA Studio handles LoRA adapters only",
                "pick a LoRA adapter folder",
            )
        raise UserError(
            f"{folder.name} has an unknown peft_type {raw.get('peft_type')!r}",
            "it may come from a newer PEFT; update PEFT or pick a LoRA adapter",
        )
    unknown = unknown_config_keys(raw)
    warnings: list[str] = []
    if unknown:
        from peft import __version__ as installed

        used = [k for k in unknown if not _is_default(raw[k])]
        recorded = f"saved by PEFT {version}" if version else "saved by an unknown PEFT version"
        if used:
            raise UserError(
                f"{folder.name} uses settings this PEFT ({installed}) does not know: {', '.join(used)} ({recorded})",
                "loading it would silently drop them; update PEFT",
            )
        warnings.append(f"ignored unknown default-valued settings {', '.join(unknown)} ({recorded})")
    where = f"{path.name} in {folder.name}"
    r = _rank(raw.get("r", 8), f"{where}: r")
    alpha = _alpha(raw.get("lora_alpha", 8), f"{where}: lora_alpha")
    targets = raw.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise UserError(f"{where}: target_modules is {targets!r}, not module names", "fix or re-save the adapter")
    rank_pattern = _pattern(raw.get("rank_pattern"), f"{where}: rank_pattern", _rank)
    alpha_pattern = _pattern(raw.get("alpha_pattern"), f"{where}: alpha_pattern", _alpha)
    return AdapterConfig(
        raw=raw,
        peft_type=peft_type,
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        target_modules=raw.get("target_modules"),
        modules_to_save=list(raw.get("modules_to_save") or []),
        trainable_token_indices=raw.get("trainable_token_indices"),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=raw.get("init_lora_weights", True),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        peft_version=version,
        warnings=tuple(warnings),
        **_read_sidecar(folder),
    )


_Number = TypeVar("_Number", int, float)

MAX_RANK = 1 << 16  # far above any real adapter; a bigger r is a damaged or hostile config


def _rank(value: object, what: str) -> int:
    """A rank as PEFT reads it: a positive whole number (not a bool, a float or a string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(
            f"{what} is {value!r}; r and lora_alpha must be numbers (r a whole number)", "fix or re-save the adapter"
        )
    if value <= 0:
        raise UserError(f"{what} is {value}", "r must be a positive rank")
    if value > MAX_RANK:
        raise UserError(f"{what} is {value}, more than any LoRA rank ({MAX_RANK})", "the adapter config is damaged")
    return value


def _alpha(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} is {value!r}; r and lora_alpha must be numbers", "fix or re-save the adapter")
    if not math.isfinite(value):
        raise UserError(f"{what} is {value}; it must be a finite number", "fix or re-save the adapter")
    return float(value)


def _pattern(value: object, what: str, check: Callable[[object, str], _Number]) -> dict[str, _Number]:
    """rank_pattern / alpha_pattern: an object of regular expressions to numbers, each checked."""
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{what} is not an object of module patterns", "fix or re-save the adapter")
    out: dict[str, _Number] = {}
    for key, number in value.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as exc:
            raise UserError(f"{what}: {key!r} is not a valid pattern ({exc})", "fix or re-save the adapter") from exc
        out[key] = check(number, f"{what}[{key!r}]")
    return out


def _read_sidecar(folder: Path) -> dict:
    """The init recorded beside the adapter; a damaged sidecar is ignored (it is only a label)."""
    path = folder / SIDECAR_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
        init = data.get("init_lora_weights")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(init, str) or not init:
        return {}
    return {"recorded_init": init[:40], "converted_to_lora": bool(data.get("converted_to_lora", False))}


def check_adapter_folder(folder: Path) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise UserError(f"{folder} does not exist", "check the adapter path")
    if folder.is_file():
        if folder.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
            return folder.parent.absolute()
        raise UserError(f"{folder} is a file, not an adapter folder", "pick the folder that holds adapter_config.json")
    if not folder.is_dir():  # a pipe, socket or device
        raise UserError(
            f"{folder} is not a folder (a pipe, socket or device)", "pick the folder that holds adapter_config.json"
        )
    if not (folder / CONFIG_NAME).exists():
        if (folder / "config.json").is_file():
            raise UserError(f"{folder.name} is a full model, not a LoRA adapter", "load it as a base model instead")
        empty = not any(folder.iterdir())
        raise UserError(
            f"{folder} {'is empty' if empty else 'has no adapter_config.json'}",
            "pick a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
        )
    if (folder / CONFIG_NAME).is_dir():
        raise UserError(f"{folder / CONFIG_NAME} is a folder, not a file", "the adapter folder is damaged")
    check_folder_contained(folder, "adapter folder")
    return folder.absolute()


def weights_file(folder: Path) -> Path:
    folder = Path(folder)
    st = folder / SAFETENSORS_NAME
    if st.exists():
        regular_file(inside(folder, SAFETENSORS_NAME, "weights file"), "weights file")
        if st.is_dir():
            raise UserError(
                f"{st} is a folder, not a weights file", "the adapter folder is damaged; save the adapter again"
            )
        return st
    binary = folder / BIN_NAME
    if binary.exists():
        regular_file(inside(folder, BIN_NAME, "weights file"), "weights file")
        if binary.is_dir():
            raise UserError(f"{binary} is a folder, not a weights file", "the adapter folder is damaged")
        return binary
    raise UserError(
        f"{folder.name} has no adapter weights ({SAFETENSORS_NAME})",
        "the adapter folder is incomplete; save the adapter again",
    )


def _load_bin(path: Path) -> dict:
    import pickle

    import torch

    try:
        # weights_only: tensors and plain containers only; a pickle that tries to run code is refused.
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UserError(
            f"{path.name} was refused: it is not a plain tensor file ({' '.join(str(exc).split())[:160]})",
            "LoRA Studio only reads pickles with weights_only=True; prefer adapter_model.safetensors",
        ) from exc
    if not isinstance(data, dict) or not all(hasattr(v, "shape") for v in data.values()):
        raise UserError(f"{path.name} does not hold a dict of tensors", "save the adapter as safetensors")
    return data


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Adapter tensor names (PEFT prefix stripped) and shapes; headers only for safetensors."""
    path = weights_file(folder)
    if path.suffix == ".safetensors":
        header = read_header(path)
        return {strip_prefix(k): v.shape for k, v in header.tensors.items()}
    return {strip_prefix(k): tuple(v.shape) for k, v in _load_bin(path).items()}


def stored_values(folder: Path) -> int:
    """How many values the adapter's weights file holds (headers only for safetensors)."""
    return sum(math.prod(shape) for shape in tensor_shapes(folder).values())


def load_tensors(folder: Path) -> dict:
    """All adapter tensors (small), PEFT prefix stripped."""
    path = weights_file(folder)
    data = load_safetensors(path) if path.suffix == ".safetensors" else _load_bin(path)
    return {strip_prefix(k): v for k, v in data.items()}


def load_safetensors(path: Path) -> dict:
    """An adapter's safetensors file, whole (adapters are small), as torch tensors; a damaged file is one line."""
    read_header(path)  # clear message for a truncated or corrupt file before safetensors' own
    from safetensors.torch import load

    try:
        return load(path.read_bytes())  # bytes, not a path: works whatever the folder's name
    except Exception as exc:
        raise UserError(
            f"cannot read {path.name}: {exc}", "the adapter weights are damaged; save the adapter again"
        ) from exc


# no trainer writes a factor or weight this large (LoRA factors are around 1, PiSSA's the root of a singular value);
# beyond it B·A overflows a 16-bit weight, and a merge writes Inf
MAX_WEIGHT_VALUE = 1e6


def check_finite(tensors: dict, folder: Path) -> None:
    """Refuse NaN/Inf weights (attached or merged, they would corrupt every output), values no trainer writes (over
    MAX_WEIGHT_VALUE) and LoRA factors stored as whole numbers (PEFT would cast them silently)."""
    import torch

    readable = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for key, t in tensors.items():
        # whole-number factors, or float8 anywhere (torch cannot even sum it on a CPU)
        if t.dtype not in readable and ("lora_" in key or t.is_floating_point()):
            raise UserError(
                f"{Path(folder).name}: {key} is stored as {str(t.dtype).removeprefix('torch.')}, not as 16, 32 or "
                "64-bit floating point",
                "the adapter weights are damaged; save the adapter again",
            )
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = largest_magnitude(t)  # NaN or Inf when the tensor holds one
        if not math.isfinite(peak):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(
                f"{Path(folder).name}: {key} has {bad} NaN/Inf values",
                "the training diverged; this adapter would corrupt every output",
            )
        if peak > MAX_WEIGHT_VALUE:
            raise UserError(
                f"{Path(folder).name}: {key} holds values up to {peak:.3g}; a merge of it overflows",
                "the training diverged, or the file is not a real adapter",
            )


def saved_without_prefix(folder: Path) -> bool:
    """Whether the weights file names its tensors without PEFT's ``base_model.model.`` prefix (some trainers strip
    it): PEFT's own loader would then place none of them."""
    path = weights_file(folder)
    keys = read_header(path).tensors if path.suffix == ".safetensors" else _load_bin(path)
    return any(not k.startswith(PEFT_PREFIX) for k in keys)


def strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


ModuleKind = Literal["linear", "embedding"]  # what a LoRA module adapts (Conv1D counts as linear)


@dataclass
class LoraModuleKeys:
    """Where one adapted module's tensors live in the adapter file."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    kind: ModuleKind
    a: str | None = None
    b: str | None = None
    magnitude: str | None = None  # DoRA
    bias: str | None = None  # lora_bias


@dataclass
class AdapterLayout:
    lora: dict[str, LoraModuleKeys] = field(default_factory=dict)
    full_weights: dict[str, str] = field(default_factory=dict)  # modules_to_save: base param name -> key
    trainable_tokens: dict[str, str] = field(default_factory=dict)  # module -> key of the delta
    unknown: list[str] = field(default_factory=list)


# key suffix -> (the kind of module it implies, None: no hint; the LoraModuleKeys field it fills)
_SUFFIXES: tuple[tuple[str, ModuleKind | None, str], ...] = (
    (".lora_A.weight", "linear", "a"),
    (".lora_B.weight", "linear", "b"),
    (".lora_B.bias", "linear", "bias"),
    (".lora_embedding_A", "embedding", "a"),
    (".lora_embedding_B", "embedding", "b"),
    (".lora_magnitude_vector.weight", None, "magnitude"),
    (".lora_magnitude_vector", None, "magnitude"),
)


def layout(keys: Iterable[str]) -> AdapterLayout:
    """Group stripped adapter keys by the module they adapt."""
    out = AdapterLayout()
    for key in keys:
        for suffix, kind, role in _SUFFIXES:
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                entry = out.lora.setdefault(module, LoraModuleKeys(module, kind or "linear"))
                if kind:
                    entry.kind = kind
                setattr(entry, role, key)
                break
        else:
            if key.endswith(".token_adapter.trainable_tokens_delta"):
                out.trainable_tokens[key[: -len(".token_adapter.trainable_tokens_delta")]] = key
            elif key.endswith((".weight", ".bias")):
                out.full_weights[key.replace(".modules_to_save.", ".").replace(".base_layer.", ".")] = key
            else:
                out.unknown.append(key)
    return out


def factors_refusal(folder: Path, runtime: str, *, dora: bool) -> str | None:
    """Why ``runtime`` (an inference engine holding an adapter as LoRA factors, and DoRA's magnitudes when ``dora``)
    cannot take this adapter as it is, or None: the checks the GGUF and mlx-lm exports share."""
    config = read_adapter_config(folder)
    lay = layout(tensor_shapes(folder))
    name = Path(folder).name
    if config.peft_type != "LORA":
        return f"{name} is a {config.peft_type} adapter; {runtime} loads {'LoRA and DoRA' if dora else 'LoRA'} adapters"
    if not dora and (config.use_dora or any(m.magnitude for m in lay.lora.values())):
        return f"{name} is a DoRA adapter; {runtime} does not apply DoRA's magnitudes"
    if any(m.bias for m in lay.lora.values()):
        return f"{name} trains LoRA biases (lora_bias), which {runtime}'s adapters do not hold"
    if lay.full_weights:
        key = next(iter(lay.full_weights))
        return f"{name} saves full weights ({key}: modules_to_save or resized embeddings), not LoRA factors"
    if lay.trainable_tokens or config.trainable_token_indices:
        return f"{name} trains token embeddings (trainable_token_indices)"
    if lay.unknown:
        return f"{name} has tensors that are not LoRA factors ({lay.unknown[0]})"
    return None
