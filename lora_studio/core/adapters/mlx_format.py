"""mlx-lm's adapter folder, to and from PEFT's: the files ``mlx_lm.load(base, adapter_path=DIR)`` reads.

mlx-lm (``mlx_lm/tuner/utils.py``: ``load_adapters``, ``linear_to_lora_layers``) keeps an adapter as:

* ``adapter_config.json``: ``fine_tune_type`` ("lora" or "dora"), ``num_layers`` (the last N decoder layers get
  LoRA layers) and ``lora_parameters`` = {``rank``, ``scale``, ``dropout``, ``keys``}: one rank and one scale for
  every adapted module, ``keys`` the module paths inside a decoder layer (``self_attn.q_proj``);
* ``adapters.safetensors``: per adapted module ``<path>.lora_a`` (in × r), ``<path>.lora_b`` (r × out) and, for
  DoRA, ``<path>.m`` (out); its layer computes ``x·W + scale·(x·lora_a)·lora_b``, so ``lora_a = Aᵀ`` and
  ``lora_b = Bᵀ`` of PEFT's ``B·A``, and DoRA's magnitude is PEFT's ``lora_magnitude_vector``.

mlx-lm checks every tensor's shape against the LoRA layers it made from the config, so PEFT's per-module ranks
(``rank_pattern``) are written zero-padded to the largest rank and PEFT's per-module scalings (rsLoRA,
``alpha_pattern``) are folded into ``lora_b`` against one scale: the product, ΔW, is PEFT's exactly. A module
mlx-lm adapts but the PEFT adapter does not (a layer outside ``layers_to_transform``, a key missing in one layer)
gets zero factors (for DoRA without a magnitude: mlx-lm starts it at the base weight's own row norms, so the layer
is the base's). The way back trims the padding and writes the per-module ranks as a ``rank_pattern``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_dir
from lora_studio.core.io.paths import data_dir, inside, regular_file

MLX_WEIGHTS = "adapters.safetensors"
MLX_CONFIG = adapter_files.CONFIG_NAME  # the same name as PEFT's; its keys tell them apart
CONVERTED_FOLDER = "converted-adapters"  # in LoRA Studio's data folder: mlx-lm adapters converted to PEFT on attach
ORIGIN_NAME = "mlx_origin.json"  # in a converted folder: the mlx-lm folder it was converted from
# a module inside a decoder layer: "<anything>layers.<index>.<path inside the layer>"
_IN_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)\.(?P<key>.+)$")
_LEAVES = {"lora_a", "lora_b", "m"}


def is_mlx_adapter(folder: Path) -> bool:
    """An mlx-lm adapter folder: its ``adapters.safetensors`` beside a config with mlx-lm's keys."""
    folder = Path(folder)
    if not (folder / MLX_WEIGHTS).is_file() or not (folder / MLX_CONFIG).is_file():
        return False
    try:
        config = json.loads((folder / MLX_CONFIG).read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and ("lora_parameters" in config or "fine_tune_type" in config)


@dataclass(frozen=True)
class MlxAdapterSummary:
    fine_tune_type: str  # "lora" or "dora"
    rank: int  # mlx-lm's one rank: the largest of the PEFT adapter's
    scale: float
    num_layers: int
    keys: tuple[str, ...]
    modules: int  # modules the PEFT adapter adapts
    padded: int  # of those, written with zero rows up to ``rank``
    folded: int  # of those, whose scaling was folded into lora_b
    zero_filled: int  # modules mlx-lm adapts that the PEFT adapter does not (zero factors)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self) | {"keys": list(self.keys)}


def mlx_refusal(adapter_folder: Path) -> str | None:
    """Why this PEFT adapter cannot be an mlx-lm adapter, or None."""
    if reason := adapter_files.factors_refusal(adapter_folder, "mlx-lm", dora=True):
        return reason
    config = adapter_files.read_adapter_config(adapter_folder)
    lay = adapter_files.layout(adapter_files.tensor_shapes(adapter_folder))
    name = Path(adapter_folder).name
    if config.fan_in_fan_out:
        return f"{name} adapts Conv1D layers (fan_in_fan_out: a GPT-2 style model); mlx-lm's models use Linear layers"
    for module, entry in lay.lora.items():
        if entry.kind == "embedding":
            return f"{name} adapts the embedding {module}; mlx-lm's adapters here hold linear layers only"
        if _IN_LAYER.match(module) is None:
            return f"{name} adapts {module}, outside the decoder layers: mlx-lm adds LoRA to its decoder layers only"
    return None


def _slots(modules: Any) -> tuple[dict[tuple[int, str], str], int, set[str], str]:
    """(layer index, key) -> module name; the lowest adapted layer; the keys; the path before the index."""
    slots: dict[tuple[int, str], str] = {}
    prefixes = set()
    for module in modules:
        match = _IN_LAYER.match(module)
        assert match is not None  # mlx_refusal refused modules outside the layers
        slots[(int(match["index"]), match["key"])] = module
        prefixes.add(match["prefix"])
    if len(prefixes) != 1:
        raise UserError(
            f"the adapter's modules are in {len(prefixes)} stacks of layers ({', '.join(sorted(prefixes))})",
            "mlx-lm adapts one stack of decoder layers",
        )
    lowest = min(index for index, _ in slots)
    return slots, lowest, {key for _, key in slots}, prefixes.pop()


def peft_to_mlx(adapter_folder: Path, out: Path, num_hidden_layers: int, *, base_label: str = "") -> MlxAdapterSummary:
    """Write the PEFT adapter as an mlx-lm adapter folder ``out`` (a folder to fill: the caller's temporary one)."""
    import torch
    from safetensors.torch import save_file

    refusal = mlx_refusal(adapter_folder)
    if refusal:
        raise UserError(refusal, "export it as a merged model instead (Hugging Face folder), which mlx-lm loads")
    config = adapter_files.read_adapter_config(adapter_folder)
    tensors = adapter_files.load_tensors(adapter_folder)
    adapter_files.check_finite(tensors, adapter_folder)
    lay = adapter_files.layout(tensors)
    dora = config.use_dora or any(m.magnitude for m in lay.lora.values())
    slots, lowest, key_set, prefix = _slots(lay.lora)
    if max(index for index, _ in slots) >= num_hidden_layers:
        raise UserError(
            f"the adapter adapts layer {max(index for index, _ in slots)} of a base with {num_hidden_layers} layers",
            "export it with the base it was trained on",
        )
    keys = sorted(key_set)
    # one rank (the largest) and one scale (the most common scaling) for mlx-lm; the rest is padding and folding
    rank = max(tensors[entry.a].shape[0] for entry in lay.lora.values() if entry.a)
    scalings = {module: config.scaling_for(module) for module in lay.lora}
    scale = Counter(scalings.values()).most_common(1)[0][0]
    shapes: dict[str, tuple[int, int]] = {}  # key -> (in, out), from the adapter's own factors
    weights: dict[str, torch.Tensor] = {}
    padded = folded = 0
    for (index, key), module in sorted(slots.items()):
        entry = lay.lora[module]
        assert entry.a and entry.b  # layout() pairs them; mlx_refusal saw no other kind
        a = tensors[entry.a].to(torch.float32)  # r × in
        b = tensors[entry.b].to(torch.float32)  # out × r
        shapes.setdefault(key, (a.shape[1], b.shape[0]))
        factor = scalings[module] / scale
        if abs(factor - 1.0) > 1e-12:
            b = b * factor
            folded += 1
        if a.shape[0] < rank:
            a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
            b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
            padded += 1
        weights[f"{prefix}.{index}.{key}.lora_a"] = a.T.contiguous()
        weights[f"{prefix}.{index}.{key}.lora_b"] = b.T.contiguous()
        if entry.magnitude:
            weights[f"{prefix}.{index}.{key}.m"] = tensors[entry.magnitude].to(torch.float32).reshape(-1).contiguous()
    zero_filled = 0
    for index in range(lowest, num_hidden_layers):
        for key in keys:
            if (index, key) in slots:
                continue
            fan_in, fan_out = shapes[key]
            weights[f"{prefix}.{index}.{key}.lora_a"] = torch.zeros(fan_in, rank)
            weights[f"{prefix}.{index}.{key}.lora_b"] = torch.zeros(rank, fan_out)
            zero_filled += 1
    fine_tune_type = "dora" if dora else "lora"
    mlx_config: dict[str, Any] = {
        "fine_tune_type": fine_tune_type,
        "num_layers": num_hidden_layers - lowest,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": float(config.raw.get("lora_dropout") or 0.0),
            "keys": keys,
        },
        "model": base_label or config.base_model_name_or_path or "",
    }
    out = Path(out)
    save_file(weights, str(out / MLX_WEIGHTS), metadata={"format": "mlx"})
    (out / MLX_CONFIG).write_text(json.dumps(mlx_config, indent=2) + "\n", "utf-8")
    return MlxAdapterSummary(
        fine_tune_type,
        rank,
        scale,
        num_hidden_layers - lowest,
        tuple(keys),
        len(slots),
        padded,
        folded,
        zero_filled,
    )


def read_mlx_config(folder: Path) -> dict:
    """mlx-lm's adapter config, checked: LoRA or DoRA, one rank and scale."""
    path = regular_file(inside(folder, MLX_CONFIG), "adapter config")
    try:
        config = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path.name} in {folder.name} is not valid JSON", "the adapter folder is damaged") from exc
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise UserError(
            f"{folder.name} is an mlx-lm full fine-tune (fine_tune_type full), not an adapter",
            "fuse it with mlx_lm.fuse and load the result as a base model",
        )
    if kind not in ("lora", "dora"):
        raise UserError(f"{folder.name}: fine_tune_type {kind!r} is not one mlx-lm writes", "use lora or dora")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise UserError(f"{folder.name}'s adapter_config.json has no lora_parameters", "the adapter folder is damaged")
    scale = params.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise UserError(f"{folder.name}: lora_parameters.scale is {scale!r}, not a number", "the folder is damaged")
    return config


def mlx_to_peft(folder: Path, into: Path) -> dict:
    """Write the mlx-lm adapter in ``folder`` as a PEFT LoRA folder ``into`` (a folder to fill); what was written."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    config = read_mlx_config(folder)
    scale = float(config["lora_parameters"]["scale"])
    tensors = adapter_files.load_safetensors(regular_file(inside(folder, MLX_WEIGHTS, "weights file"), "weights file"))
    adapter_files.check_finite(tensors, folder)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in _LEAVES or not module:
            raise UserError(f"{folder.name}: {key} is not an mlx-lm LoRA tensor", "the adapter folder is damaged")
        by_module.setdefault(module, {})[leaf] = value
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    dora = config.get("fine_tune_type") == "dora"
    for module, parts in sorted(by_module.items()):
        if "lora_a" not in parts or "lora_b" not in parts:
            raise UserError(f"{folder.name}: {module} lacks lora_a or lora_b", "the adapter folder is damaged")
        a = parts["lora_a"].to(torch.float32).T  # r × in
        b = parts["lora_b"].to(torch.float32).T  # out × r
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(
                f"{folder.name}: {module}'s factors are {tuple(parts['lora_a'].shape)} and "
                f"{tuple(parts['lora_b'].shape)}, not (in, r) and (r, out)",
                "mlx-lm's switch (MoE) layers are not converted",
            )
        used = (a.abs().sum(1) + b.abs().sum(0)) > 0
        if not bool(used.any()) and (not dora or "m" not in parts):
            continue  # zero factors (and DoRA's magnitude left to mlx-lm: the base's own norms): no update
        rank = int(used.nonzero().max()) + 1 if bool(used.any()) else a.shape[0]
        ranks[module] = rank
        out[f"{adapter_files.PEFT_PREFIX}{module}.lora_A.weight"] = a[:rank].contiguous()
        out[f"{adapter_files.PEFT_PREFIX}{module}.lora_B.weight"] = b[:, :rank].contiguous()
        if dora:
            if "m" not in parts:
                raise UserError(f"{folder.name}: the DoRA module {module} has no magnitude m", "the folder is damaged")
            out[f"{adapter_files.PEFT_PREFIX}{module}.lora_magnitude_vector"] = parts["m"].to(torch.float32)
    if not ranks:
        raise UserError(f"{folder.name} has no non-zero LoRA factors", "train the adapter first")
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: r for module, r in ranks.items() if r != common}
    lora_config = LoraConfig(
        r=common,
        lora_alpha=scale * common,  # type: ignore[arg-type]  # PEFT takes a float alpha (its annotation says int)
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern={module: scale * r for module, r in pattern.items()},
        lora_dropout=float(config["lora_parameters"].get("dropout") or 0.0),
        use_dora=dora,
        base_model_name_or_path=str(config.get("model") or "") or None,
    )
    into = Path(into)
    lora_config.save_pretrained(str(into))
    save_file(out, str(into / adapter_files.SAFETENSORS_NAME), metadata={"format": "pt"})
    return {
        "modules": len(ranks),
        "rank": common,
        "scale": scale,
        "fine_tune_type": config.get("fine_tune_type", "lora"),
    }


def as_peft_folder(folder: Path) -> tuple[Path, str | None]:
    """The PEFT folder to load for ``folder``: itself, or for an mlx-lm adapter its conversion in LoRA Studio's data
    folder (made once per content), with a line saying so."""
    folder = Path(folder)
    if not is_mlx_adapter(folder):
        return folder, None
    digest = hashlib.sha256()
    for name in (MLX_CONFIG, MLX_WEIGHTS):  # the files as they are now: an edited adapter is converted again
        digest.update(regular_file(inside(folder, name), "adapter file").read_bytes())
    target = data_dir() / CONVERTED_FOLDER / f"{folder.name}.peft-{digest.hexdigest()[:12]}"
    if not (target / adapter_files.SAFETENSORS_NAME).is_file():
        with atomic_output_dir(target, overwrite=True) as tmp:
            mlx_to_peft(folder, tmp)
            (tmp / ORIGIN_NAME).write_text(json.dumps({"mlx_folder": str(folder.absolute())}) + "\n", "utf-8")
    return target, f"converted from mlx-lm's format to a PEFT adapter ({target})"


def mlx_origin(folder: Path) -> Path | None:
    """The mlx-lm folder a converted PEFT folder came from, while it is still there; None for any other folder."""
    try:
        recorded = json.loads((Path(folder) / ORIGIN_NAME).read_text("utf-8"))["mlx_folder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    origin = Path(str(recorded))
    return origin if is_mlx_adapter(origin) else None
