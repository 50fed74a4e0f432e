"""Each layer PEFT's ``get_peft_model`` gives a LoRA, reported (and a chance to cancel) before it is built.

``get_peft_model`` builds every targeted layer in one call; with OLoRA or PiSSA each build is a QR or an SVD of
that layer's weight, minutes in all on a large model, with no callback. PEFT's ``LoraModel`` builds each layer
through its ``_create_and_replace``: :func:`reporting_layers` wraps that method, for the calling thread and the
duration of one call, so ``report`` hears of each layer (``n/total``) and a cancel stops between layers. When the
method is missing or its signature changed, nothing is wrapped and the init runs without per-layer progress,
with a warning once.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import original_of, swapped, warn_inactive
from lora_studio.core.tasks import CancelToken, Progress, Report

HOOK = "PEFT init progress"
TARGET = "peft.tuners.lora.LoraModel._create_and_replace"
EXPECTED = ("self", "lora_config", "adapter_name", "target", "target_name", "parent", "current_key")


def _inactive_reason() -> str:
    try:
        from peft.tuners.lora import LoraModel
    except ImportError as exc:
        return f"peft's LoraModel is not importable ({exc})"
    method = getattr(LoraModel, "_create_and_replace", None)
    if not callable(method):
        return "LoraModel has no _create_and_replace any more"
    try:
        names = tuple(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return "the signature of LoraModel._create_and_replace is not readable"
    if names[: len(EXPECTED)] != EXPECTED:
        return f"LoraModel._create_and_replace takes {names}, not {EXPECTED}"
    return ""


def checks() -> dict[str, str]:
    return {TARGET: _inactive_reason() or ACTIVE}


@contextmanager
def reporting_layers(total: int, stage: str, cancel: CancelToken, report: Report) -> Iterator[None]:
    """While inside, each layer this thread's ``get_peft_model`` adapts is reported as ``stage: layer n/total``
    before it is built; a cancel raises ``Cancelled`` before the next one."""
    reason = _inactive_reason()
    if reason:
        warn_inactive(HOOK, reason)
        yield
        return
    from peft.tuners.lora import LoraModel

    original = original_of(inspect.getattr_static(LoraModel, "_create_and_replace"))
    built = 0

    def create_and_replace(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal built
        cancel.raise_if_cancelled()
        report(Progress(built, total, f"{stage}: layer {built}/{total}", "layers"))
        result = original(self, *args, **kwargs)
        built += 1
        return result

    with swapped(LoraModel, "_create_and_replace", create_and_replace):
        yield
    report(Progress(total, total, f"{stage}: layer {total}/{total}", "layers"))
