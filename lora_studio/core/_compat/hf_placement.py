"""The device map ``from_pretrained(device_map=..., max_memory=...)`` makes, computed before loading.

transformers places a model with its own copies of accelerate's functions (``transformers.integrations.accelerate``:
``get_balanced_memory``, ``get_max_memory``, ``infer_auto_device_map``) in the order of its private
``_get_device_map``; accelerate's own functions place a tied head elsewhere. :func:`planned_device_map` runs that
order on a model built without weights, so the plan is the map the load makes. If those functions moved,
accelerate's own run instead, with a warning (the plan may then differ from the load for tied weights).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import import_target, warn_inactive

HOOK = "transformers' placement"
MODULE = "transformers.integrations.accelerate"
FUNCTIONS = ("get_balanced_memory", "get_max_memory", "infer_auto_device_map")


def _inactive_reason() -> tuple[Any, str]:
    module, reason = import_target(MODULE)
    if module is None:
        return None, reason
    missing = [name for name in FUNCTIONS if not callable(getattr(module, name, None))]
    if missing:
        return None, f"{MODULE} has no {', '.join(missing)}"
    return module, ""


def checks() -> dict[str, str]:
    return {f"{MODULE} ({', '.join(FUNCTIONS)})": _inactive_reason()[1] or ACTIVE}


def planned_device_map(model: Any, limits: Mapping[int | str, int], device_map: str = "auto") -> dict[str, Any]:
    """The module -> device map for ``model`` (built without weights, tied) under ``limits``, as transformers'
    ``_get_device_map`` computes it for ``device_map`` (auto, balanced, balanced_low_0 or sequential)."""
    placing, reason = _inactive_reason()
    if placing is None:
        warn_inactive(HOOK, reason)
        placing = importlib.import_module("accelerate.utils")
    no_split = model._no_split_modules
    if device_map != "sequential":
        memory = placing.get_balanced_memory(
            model, max_memory=dict(limits), no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
        )
    else:
        memory = placing.get_max_memory(dict(limits))
    return dict(placing.infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split))
