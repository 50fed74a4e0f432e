"""Decoder layers without any LoRA module run once for every variant of a mixed batch.

A mixed-adapter batch of V variants over the same B examples holds V copies of each row. Up to the first
decoder layer that holds a LoRA module, every copy computes exactly the same hidden states (the layers below
are the base's), so :func:`shared_prefix` feeds the model the B distinct rows and, at that layer, repeats the
hidden states V times (copy-major: row ``k·B + i`` is copy k of row i), together with every per-row input the
model hands its layers (attention mask, position ids, rotary embeddings). The rest of the forward -- the
adapted layers, the final norm, the head -- sees V·B rows as before, so the logits are those of the full batch.
Adapters trained on the top layers only (the demo adapters: 12 of 30) save most of the forward.

The hook is a forward pre-hook on the model's decoder layers, registered for one call under the session's
lock (the model runs nothing else meanwhile). It applies only when the decoder's layers are found
(``get_decoder().layers``) and nothing before the first adapted layer is an adapter module (LoRA embeddings,
``modules_to_save`` / trainable-token wrappers); otherwise the caller runs the full batch (same results).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import import_target, warn_inactive

HOOK = "shared decoder prefix"


def _layers(model: Any) -> tuple[Any, str]:
    """The decoder's ModuleList, or (None, why not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    torch_nn, reason = import_target("torch.nn")
    if torch_nn is None:
        return None, reason
    if not isinstance(layers, torch_nn.ModuleList) or not len(layers):
        return None, f"{type(base).__name__} has no get_decoder().layers"
    return layers, ""


def first_adapted_layer(model: Any) -> tuple[int | None, str]:
    """Index of the first decoder layer holding an adapter module; (None, why sharing does not apply)."""
    layers, reason = _layers(model)
    if layers is None:
        return None, reason
    peft_utils, reason = import_target("peft.utils")
    lora, lora_reason = import_target("peft.tuners.lora")
    if peft_utils is None or lora is None:
        return None, reason or lora_reason
    adapter_types = tuple(
        t
        for t in (getattr(lora, "LoraLayer", None), getattr(peft_utils, "AuxiliaryTrainingWrapper", None))
        if isinstance(t, type)
    )
    if len(adapter_types) < 2:
        return None, "peft no longer has LoraLayer and AuxiliaryTrainingWrapper"
    inside = {id(m) for layer in layers for m in layer.modules()}
    if any(isinstance(m, adapter_types) and id(m) not in inside for m in model.modules()):
        return None, "an adapter module sits outside the decoder layers (embeddings or modules_to_save)"
    for index, layer in enumerate(layers):
        if any(isinstance(m, adapter_types) for m in layer.modules()):
            return index, ""
    return None, "no decoder layer holds an adapter module"


def checks() -> dict[str, str]:
    peft_utils, reason = import_target("peft.utils")
    if peft_utils is None:
        return {HOOK: reason}
    return {HOOK: ACTIVE if isinstance(getattr(peft_utils, "AuxiliaryTrainingWrapper", None), type) else reason}


def _repeat(value: Any, rows: int, copies: int) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_repeat(v, rows, copies) for v in value)
    return value


@contextmanager
def shared_prefix(model: Any, rows: int, copies: int) -> Iterator[bool]:
    """While inside, a forward of ``rows`` distinct rows runs as ``copies`` copies of them from the first adapted
    decoder layer on; yields False (and hooks nothing) when that does not apply, and the caller then passes the
    full batch."""
    first, reason = first_adapted_layer(model) if copies > 1 else (None, "one copy: nothing to share")
    if first is None:
        if copies > 1:
            warn_inactive(HOOK, reason)
        yield False
        return
    layers, _ = _layers(model)

    def expand(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (
            tuple(_repeat(a, rows, copies) for a in args),
            {k: _repeat(v, rows, copies) for k, v in kwargs.items()},
        )

    handles = [layer.register_forward_pre_hook(expand, with_kwargs=True) for layer in list(layers)[first:]]
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()
