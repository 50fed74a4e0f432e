"""bitsandbytes' CPU layout of a 4-bit weight undone with the block scales in their own order.

On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight on the layer's first inference forward
(``_convert_weight_packed_for_cpu``): the 4-bit codes are interleaved for its kernel and the per-block scales
(``absmax``, a flat ``N·K/64`` float32 vector, block ``n·K/64 + k``) become a transposed ``[K/64, N]`` bfloat16
matrix. Every ``state_dict()`` of the model -- PEFT's ``load_adapter`` takes one -- goes through
``Linear4bit._save_to_state_dict``, which first undoes the packing (``_convert_weight_packed_for_cpu_inverse``);
for a quant state without double quantisation that inverse restores the codes but leaves the scales as the
transposed matrix (bitsandbytes 0.50.2). The layer's next forward packs again and reads that matrix as if it were
the flat vector: most blocks get another block's scale. An adapter attached to a 4-bit base that had answered one
prompt then ran on a scrambled base (0.17 in a tiny Llama's logits; the base layers wrong, the LoRA ones right).

:func:`block_scales_restored` swaps that inverse, for the calling thread, for one that calls bitsandbytes' and then
puts the scales back as the flat float32 vector. Their values are the packed bfloat16 ones (the packing rounded
them; packing them again gives the same matrix bit for bit), so the layer computes after a state dict exactly as
before it. The repair applies only where bitsandbytes left the packed matrix: a release that restores the scales
itself is left alone. If bitsandbytes moved or changed the function (gone, another signature, ``Linear4bit`` no
longer calls it) or a round trip on a small weight does not come back to the same packed weight, bitsandbytes' own
inverse is used, with a warning. Nothing is imported, and nothing swapped, while bitsandbytes is not loaded: there
is then no 4-bit layer to read.

:func:`packing_off` is for training (QLoRA): the packed layout has a forward kernel only (``gemv_4bit``, no
backward), and an evaluation inside a run (a forward outside training mode) would pack every layer for good, so the
training steps after it would backpropagate through a kernel without a gradient (torch warns: "silently incorrect").
While inside, the packing, for the calling thread, leaves the weight as it is: evaluations run the same unpacked
kernel as the training steps. If ``Linear4bit`` no longer packs through that function, a warning says so.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import code_uses_name, import_target, original_of, swapped, warn_inactive

HOOK = "bitsandbytes CPU 4-bit unpacking"
MODULE = "bitsandbytes.nn.modules"  # where Linear4bit looks the function up (imported by name from functional)
NAME = "_convert_weight_packed_for_cpu_inverse"
PACK = "_convert_weight_packed_for_cpu"
LAYER_CLASS = "Linear4bit"
_P = inspect.Parameter
SIGNATURE = (
    ("packed_weight", _P.POSITIONAL_OR_KEYWORD),
    ("quant_state", _P.POSITIONAL_OR_KEYWORD),
    ("block_n", _P.POSITIONAL_OR_KEYWORD),
)


def _target() -> tuple[Any, Any, str]:
    """``(bitsandbytes.nn.modules, its inverse, "")``, or ``(None, None, why not)``."""
    module, reason = import_target(MODULE)
    if module is None:
        return None, None, reason
    inverse, pack = original_of(getattr(module, NAME, None)), original_of(getattr(module, PACK, None))
    if not inspect.isfunction(inverse) or not inspect.isfunction(pack):
        return None, None, f"{MODULE} has no {NAME} or {PACK} function any more"
    found = tuple((p.name, p.kind) for p in inspect.signature(inverse).parameters.values())
    if found != SIGNATURE:
        return None, None, f"{NAME} has another signature: {inspect.signature(inverse)}"
    layer = getattr(module, LAYER_CLASS, None)
    if not isinstance(layer, type) or not code_uses_name(layer, NAME) or not code_uses_name(layer, PACK):
        return None, None, f"{MODULE}.{LAYER_CLASS} no longer packs and unpacks its weight with {PACK}/{NAME}"
    reason = _round_trip_reason(module, inverse, pack)
    return (module, inverse, "") if not reason else (None, None, reason)


def restoring(original: Any) -> Any:
    """bitsandbytes' inverse ``original``, followed by the block scales put back in their unpacked order."""

    def inverse(packed_weight: Any, quant_state: Any, block_n: int = 32) -> Any:
        import torch

        packed_absmax = quant_state.absmax
        nested = getattr(quant_state, "original_nested", quant_state.nested)
        weight, state = original(packed_weight, quant_state, block_n)
        if not nested and state.absmax is packed_absmax and packed_absmax.dim() == 2:
            # packed: absmax.reshape(N, K / blocksize).T as bfloat16; flat again in block order, as quantised
            state.absmax = packed_absmax.t().reshape(-1).to(torch.float32)
        return weight, state

    return inverse


@functools.lru_cache(maxsize=1)
def _round_trip_reason(module: Any, inverse: Any, pack: Any) -> str:
    """'' when pack -> repaired inverse -> pack gives back the first packed weight and scales (a 64x128 NF4 weight);
    else what differs. Cached: library code does not change while the process runs."""
    import torch

    functional, reason = import_target("bitsandbytes.functional")
    if functional is None:
        return reason
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn((64, 128), generator=generator)
        codes, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
        flat_absmax = state.absmax.clone()
        packed, state = pack(codes.clone(), state)
        packed_absmax = state.absmax.clone()
        unpacked, state = restoring(inverse)(packed, state)
        same_codes = torch.equal(unpacked, codes)
        same_scales = state.absmax.dtype == flat_absmax.dtype and torch.equal(
            state.absmax, flat_absmax.to(torch.bfloat16).to(flat_absmax.dtype)
        )
        repacked, state = pack(unpacked, state)
        same_packed = torch.equal(repacked, packed) and torch.equal(state.absmax, packed_absmax)
    except Exception as exc:  # noqa: BLE001 - a changed private function: the hook is off, nothing breaks
        return f"a round trip through {PACK} and {NAME} failed ({type(exc).__name__}: {exc})"
    if not (same_codes and same_scales and same_packed):
        return f"{PACK}/{NAME} lay the 4-bit weight out another way (a round trip does not come back to it)"
    return ""


def checks() -> dict[str, str]:
    return {f"{MODULE}.{NAME}": _target()[2] or ACTIVE}


def _not_packed(weight: Any, quant_state: Any) -> tuple[Any, Any]:
    return weight, quant_state


@contextmanager
def packing_off() -> Iterator[None]:
    """While inside, a 4-bit layer's forward on this thread never packs its weight for the CPU inference kernel
    (a no-op while bitsandbytes is not imported)."""
    if MODULE not in sys.modules:
        yield
        return
    module, reason = import_target(MODULE)
    layer = getattr(module, LAYER_CLASS, None) if module is not None else None
    if module is not None and not (
        inspect.isfunction(original_of(getattr(module, PACK, None)))
        and isinstance(layer, type)
        and code_uses_name(layer, PACK)
    ):
        reason = f"{MODULE}.{LAYER_CLASS} no longer packs its weight with {PACK}"
    if reason or module is None:
        warn_inactive(HOOK, reason)
        yield
        return
    with swapped(module, PACK, _not_packed):
        yield


@contextmanager
def block_scales_restored() -> Iterator[None]:
    """While inside, a 4-bit layer's ``state_dict()`` on this thread leaves its block scales in order.

    A no-op while bitsandbytes is not imported (no 4-bit layer exists then).
    """
    if MODULE not in sys.modules:
        yield
        return
    module, original, reason = _target()
    if module is None:
        warn_inactive(HOOK, reason)
        yield
        return
    with swapped(module, NAME, restoring(original)):
        yield
