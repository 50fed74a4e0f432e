"""Where a model's layers go: the user's memory limits per device (transformers' ``max_memory``), the planned share
of each device before loading, and where each layer went after.

accelerate owns the placement: ``infer_auto_device_map`` on the model built without weights gives the plan, and the
same limits passed to ``from_pretrained`` give the load; what overflows the last device goes to disk (an offload
folder of the session's, removed when the base is unloaded). ``--max-memory cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_studio.core.errors import UserError

if TYPE_CHECKING:
    from lora_studio.core.model.sources import ModelSource

MaxMemory = dict[int | str, int]  # accelerate's keys: a GPU index, "cpu", "mps" or "disk"; sizes in bytes
PLACED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
HINT = "write it like cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB; sizes in GiB, GB, MiB or MB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb|kib|kb|b)?\s*$", re.IGNORECASE)
_UNITS = {"gib": 1024**3, "gb": 10**9, "mib": 1024**2, "mb": 10**6, "kib": 1024, "kb": 1000, "b": 1}


def parse_max_memory(text: str) -> MaxMemory:
    """``cuda:0=20GiB,cpu=64GiB`` as accelerate's ``max_memory``; a UserError naming the part that is wrong."""
    limits: MaxMemory = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        device = device.strip().lower()
        match = _SIZE.match(size)
        if not sep:
            raise UserError(f"memory limits: {part!r} is not DEVICE=SIZE", HINT)
        if match is None:
            raise UserError(f"memory limits: {size.strip()!r} is not a size (for {device.strip()})", HINT)
        key: int | str
        if device in ("cpu", "mps", "disk"):
            key = device
        elif (index := device.removeprefix("cuda:")).isdigit() and device.startswith("cuda:"):
            key = int(index)
        else:
            raise UserError(f"memory limits: {device!r} is not a device (cpu, mps, disk or cuda:N)", HINT)
        if key in limits:
            raise UserError(f"memory limits name {device} twice", HINT)
        limits[key] = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if not limits:
        raise UserError("the memory limits are empty", HINT)
    return limits


def check_max_memory(limits: Mapping[int | str, int]) -> None:
    """A GPU index this machine has (accelerate would fail later, deep in the load)."""
    gpus = [k for k in limits if isinstance(k, int)]
    if not gpus:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [f"cuda:{k}" for k in gpus if k >= count]
    if missing:
        have = ", ".join(f"cuda:{i}" for i in range(count)) or "no CUDA device"
        raise UserError(f"the memory limits name {', '.join(missing)}; this machine has {have}", "name devices it has")


def device_label(key: int | str) -> str:
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def format_max_memory(limits: Mapping[int | str, int]) -> str:
    from lora_studio.core.system.memory import format_bytes

    return ", ".join(f"{device_label(k)} {format_bytes(v)}" for k, v in limits.items())


@dataclass(frozen=True)
class PlannedPlacement:
    """Bytes of weights per device, as accelerate would place the model under these limits."""

    bytes_per_device: dict[str, int]
    device_map: dict[str, str]  # module -> device

    def to_json(self) -> dict:
        return {"bytes_per_device": self.bytes_per_device, "layers": placed_layers(self.device_map)}


def plan_placement(
    source: ModelSource, dtype: str, limits: Mapping[int | str, int], *, device_map: str = "auto"
) -> PlannedPlacement:
    """The device map ``from_pretrained`` makes for ``source`` under ``limits`` (transformers' own placement
    functions, on the model built without weights: tied weights count once), and each device's bytes of weights,
    from the configuration alone."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_studio.core._compat.hf_placement import planned_device_map
    from lora_studio.core.model.dtypes import torch_dtype

    if source.gguf_file:
        raise UserError("a GGUF base is placed on one device", "drop --max-memory for a .gguf base")
    check_max_memory(limits)
    config = AutoConfig.from_pretrained(str(source.path))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.tie_weights()  # a tied head shares the embedding's tensor, as in the loaded model
    placed = planned_device_map(model, limits, device_map)
    per_device: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:  # each shared tensor once
        owner = max((m for m in placed if m == "" or name == m or name.startswith(m + ".")), key=len, default=None)
        if owner is None:
            continue
        label = device_label(placed[owner])
        per_device[label] = (
            per_device.get(label, 0) + tensor.numel() * torch.empty((), dtype=tensor.dtype).element_size()
        )
    return PlannedPlacement(per_device, {m: device_label(d) for m, d in placed.items()})


def placed_layers(device_map: Mapping[str, Any]) -> dict[str, str]:
    """Per device, its modules in words, runs of decoder layers folded: {"cpu": "embed_tokens, layers 0–11",
    "disk": "layers 12–29, norm, lm_head"}."""
    grouped: dict[str, list[str]] = {}
    for module, device in device_map.items():
        grouped.setdefault(device_label(device), []).append(module)
    return {device: _fold(modules) for device, modules in grouped.items()}


def placement_line(device_map: Mapping[str, Any]) -> str:
    return "; ".join(f"{device}: {modules}" for device, modules in placed_layers(device_map).items())


def _fold(modules: list[str]) -> str:
    words: list[str] = []
    run: list[int] = []
    run_prefix = ""

    def flush() -> None:
        if run:
            span = f"{run[0]}" if len(run) == 1 else f"{run[0]}–{run[-1]}"
            words.append(f"{run_prefix.rsplit('.', 1)[-1] or 'layers'} {span}")
            run.clear()

    for module in modules:
        prefix, _, index = module.rpartition(".")
        if index.isdigit() and (not run or (prefix == run_prefix and int(index) == run[-1] + 1)):
            run_prefix = prefix
            run.append(int(index))
            continue
        flush()
        if index.isdigit():
            run_prefix = prefix
            run.append(int(index))
        else:
            words.append(module.rsplit(".", 1)[-1] if module else "the whole model")
    flush()
    return ", ".join(words)
