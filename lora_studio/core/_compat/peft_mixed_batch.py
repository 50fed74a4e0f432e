"""Mixed-adapter batches whose rows are grouped by adapter: each LoRA update added to a contiguous slice.

PEFT's ``_mixed_batch_forward`` (LoRA ``Linear``) gathers each adapter's rows with a Python index list and
scatters the update back (two index ops per adapter per layer per step), which on a CPU costs as much as
the model itself at small batches. A comparison's rows are grouped by adapter, so a slice view does the
same arithmetic on the same rows without copies. :func:`contiguous_sub_batches` swaps that method, for the
calling thread, for one that does so when the call is the grouped batch it was given; anything else
(another ``adapter_names`` list, LoRA variants such as aLoRA, another layer class) goes to PEFT's own
method. If PEFT changed the method, its call or the layer's fields, PEFT's own method does all of it
(slower, same results), with a warning.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import code_uses_name, import_target, original_of, swapped, warn_inactive

HOOK = "PEFT mixed-batch forward"
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
LAYER_MODULE = "peft.tuners.lora"
LAYER_CLASS = "Linear"
METHOD = "_mixed_batch_forward"
VARIANT_KEYS_MODULE = "peft.tuners.lora.layer"
VARIANT_KEYS = "VARIANT_KWARG_KEYS"
_P = inspect.Parameter
SIGNATURE = (
    ("self", _P.POSITIONAL_OR_KEYWORD),
    ("x", _P.POSITIONAL_OR_KEYWORD),
    ("args", _P.VAR_POSITIONAL),
    ("adapter_names", _P.KEYWORD_ONLY),
    ("kwargs", _P.VAR_KEYWORD),
)


def _target() -> tuple[Any, Any, tuple[str, ...], str]:
    """``(layer class, PEFT's method, variant kwarg keys, "")``, or ``(None, None, (), why not)``."""
    lora, reason = import_target(LAYER_MODULE)
    if lora is None:
        return None, None, (), reason
    layer_class = getattr(lora, LAYER_CLASS, None)
    base_class = getattr(lora, "LoraLayer", None)
    if not isinstance(layer_class, type) or not isinstance(base_class, type):
        return None, None, (), f"{LAYER_MODULE} has no {LAYER_CLASS} or LoraLayer class any more"
    try:
        method = original_of(inspect.getattr_static(layer_class, METHOD))
    except AttributeError:
        return None, None, (), f"{LAYER_MODULE}.{LAYER_CLASS} has no {METHOD} any more"
    if not inspect.isfunction(method):
        return None, None, (), f"{LAYER_CLASS}.{METHOD} is no longer a plain method"
    found = tuple((p.name, p.kind) for p in inspect.signature(method).parameters.values())
    if found != SIGNATURE:
        return None, None, (), f"{LAYER_CLASS}.{METHOD} has another signature: {inspect.signature(method)}"
    forward = original_of(inspect.getattr_static(layer_class, "forward", None))
    if not inspect.isfunction(forward) or not code_uses_name(forward, METHOD):
        return None, None, (), f"{LAYER_CLASS}.forward no longer calls {METHOD}"
    if (
        not {"lora_A", "lora_B"} <= set(getattr(base_class, "adapter_layer_names", ()))
        or not {"scaling", "lora_dropout"} <= set(getattr(base_class, "other_param_names", ()))
        or not code_uses_name(inspect.getattr_static(base_class, "__init__"), "lora_variant")
    ):
        return None, None, (), "LoraLayer no longer keeps lora_A/lora_B/scaling/lora_dropout/lora_variant per adapter"
    layer_module, reason = import_target(VARIANT_KEYS_MODULE)
    if layer_module is None:
        return None, None, (), reason
    keys = getattr(layer_module, VARIANT_KEYS, None)
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
        return None, None, (), f"{VARIANT_KEYS_MODULE}.{VARIANT_KEYS} is gone or not a list of names"
    return layer_class, method, tuple(keys), ""


def checks() -> dict[str, str]:
    return {
        f"{LAYER_MODULE}.{LAYER_CLASS}.{METHOD}": _target()[3] or ACTIVE,
        "torch.nn.Module._forward_pre_hooks": _hooks_reason() or ACTIVE,
    }


def _hooks_reason() -> str:
    torch_nn, reason = import_target("torch.nn")
    if torch_nn is None:
        return reason
    probe = torch_nn.Module()
    if not all(
        isinstance(getattr(probe, n, None), dict) for n in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
    ):
        return "torch.nn.Module keeps its forward pre-hooks elsewhere"
    return ""


@contextmanager
def stray_hooks_removed(model: Any) -> Iterator[None]:
    """PEFT adds a forward pre-hook to every LoRA layer for a mixed batch (to hand each its ``adapter_names``) and
    removes them only when the forward returns. A forward that raises -- a batch PEFT refuses at run time, such as
    OPT's MLP, which flattens the batch -- leaves them behind, and every later call on the model would get that
    batch's names. On an exception inside the block, the pre-hooks added inside it are removed."""
    reason = _hooks_reason()
    if reason:
        warn_inactive("PEFT mixed-batch hook clean-up", reason)
        yield
        return
    before = {id(m): set(m._forward_pre_hooks) for m in model.modules()}
    try:
        yield
    except BaseException:
        for module in model.modules():
            for key in set(module._forward_pre_hooks) - before.get(id(module), set()):
                module._forward_pre_hooks.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        raise


def groups_of(names: list[str]) -> list[tuple[str, int, int]]:
    """``(adapter, start, stop)`` for each run of equal names."""
    out: list[tuple[str, int, int]] = []
    for i, name in enumerate(names):
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1], i + 1)
        else:
            out.append((name, i, i + 1))
    return out


@contextmanager
def contiguous_sub_batches(adapter_names: list[str]) -> Iterator[None]:
    """While inside, LoRA Linear layers on this thread add each adapter's update to a contiguous slice.

    Only for a forward whose ``adapter_names`` is this list; PEFT's own method does every other call.
    """
    layer_class, original, variant_keys, reason = _target()
    if layer_class is None:
        warn_inactive(HOOK, reason)
        yield
        return
    names = adapter_names
    groups = groups_of(adapter_names)

    def mixed_batch_forward(layer: Any, x: Any, *args: Any, adapter_names: list[str], **kwargs: Any) -> Any:
        if type(layer) is not layer_class:
            return original(layer, x, *args, adapter_names=adapter_names, **kwargs)
        return _sliced_mixed_forward(
            layer, original, names, groups, variant_keys, x, *args, adapter_names=adapter_names, **kwargs
        )

    with swapped(layer_class, METHOD, mixed_batch_forward):
        yield


def _sliced_mixed_forward(
    layer: Any,
    original: Any,
    names: list[str],
    groups: list[tuple[str, int, int]],
    variant_keys: tuple[str, ...],
    x: Any,
    *args: Any,
    adapter_names: list[str],
    **kwargs: Any,
) -> Any:
    if (
        (adapter_names is not names and adapter_names != names)
        or len(x) != len(names)
        or any(kwargs.get(k) is not None for k in variant_keys)
        or any(g[0] in layer.lora_variant for g in groups)
    ):
        return original(layer, x, *args, adapter_names=adapter_names, **kwargs)
    for k in variant_keys:
        kwargs.pop(k, None)
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name, start, stop in groups:
        if name == BASE or name not in layer.lora_A:
            continue
        lora_A = layer.lora_A[name]
        sub = x[start:stop].to(lora_A.weight.dtype)
        update = layer.lora_B[name](lora_A(layer.lora_dropout[name](sub))) * layer.scaling[name]
        result[start:stop] += update.to(dtype)
    return result
