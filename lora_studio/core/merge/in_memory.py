"""In-memory merge: PEFT's own per-layer ``merge`` on a loaded PeftModel, without disturbing it.

``merge_and_unload`` would fold the adapter into the session's base for good (and
undoing it in half precision is not exact), so the session could no longer show
the adapter model or serve as the verification reference. Instead, each LoRA layer
is merged by PEFT's ``layer.merge`` into a *copy* of its weight, which is taken for
the output, and the original tensor is put back. The bits are PEFT's (same code,
same dtypes: DoRA, lora_bias, Conv1D and embeddings included), the session stays
as it was, and the extra memory is one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from lora_studio.core.errors import UserError
from lora_studio.core.io.safetensors_format import st_dtype
from lora_studio.core.tasks import CancelToken

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper, TrainableTokensWrapper

    # Where an output tensor comes from: a LoRA layer's merged "weight"/"bias", or a tensor saved as it is.
    _Entry = tuple[Literal["lora"], LoraLayer, str] | tuple[Literal["tensor"], torch.Tensor, None]


def _wrapper_types() -> tuple[type[LoraLayer], type[ModulesToSaveWrapper], type[TrainableTokensWrapper] | tuple[()]]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    try:
        from peft.utils import TrainableTokensWrapper
    except ImportError:  # pragma: no cover - older PEFT
        return LoraLayer, ModulesToSaveWrapper, ()
    return LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper


def merge_layer_copy(layer: LoraLayer, adapter_name: str, safe_merge: bool) -> dict[str, torch.Tensor]:
    """PEFT's merge of ``adapter_name`` into copies of ``layer``'s base weight (and bias).

    The layer is left untouched.
    """
    base = layer.get_base_layer()
    if getattr(layer, "lora_bias", {}).get(adapter_name) and getattr(base, "bias", None) is None:
        raise UserError(
            f"{adapter_name} trains LoRA biases (lora_bias) for a layer without a bias: PEFT cannot merge it",
            "use the adapter unmerged, or retrain it without lora_bias",
        )
    saved = {}
    for pname in ("weight", "bias"):
        p = getattr(base, pname, None)
        if p is not None:
            saved[pname] = p.data
            p.data = p.data.clone()
    merged_before = list(layer.merged_adapters)
    caches_before = set(getattr(layer, "_caches", {}))
    try:
        try:
            layer.merge(safe_merge=safe_merge, adapter_names=[adapter_name])
        except ValueError as exc:  # safe_merge found NaN/Inf
            raise UserError(
                f"merging {adapter_name} would put NaN/Inf into the weights", "the adapter is broken; do not merge it"
            ) from exc
        return {pname: getattr(base, pname).data for pname in saved}
    finally:
        for pname, data in saved.items():
            getattr(base, pname).data = data
        layer.merged_adapters[:] = merged_before
        for key in set(getattr(layer, "_caches", {})) - caches_before:
            layer._caches.pop(key, None)


class InMemoryPlan:
    """Output names, in order, with where each tensor comes from in the PeftModel."""

    def __init__(self, peft_model: PeftModel, adapter_name: str, out_dtype: str | None = None) -> None:
        import torch

        LoraLayer, _, TrainableTokens = _wrapper_types()
        self.model = peft_model
        self.adapter_name = adapter_name
        self.out_dtype = getattr(torch, out_dtype) if out_dtype else None
        base = peft_model.get_base_model()
        modules = dict(base.named_modules())
        self.entries: dict[str, _Entry] = {}  # out name -> where its tensor comes from
        seen_storage: dict[int, str] = {}  # storage -> the out name that saves it
        for key, tensor in base.state_dict(keep_vars=True).items():
            if ".lora_" in key or ".modules_to_save." in key or ".token_adapter." in key:
                continue
            if ".original_module." in key:
                # modules_to_save: the adapter's own copy is what gets saved, even where the original is tied
                owner, pname = key.rsplit(".original_module.", 1)
                copies = getattr(modules[owner], "modules_to_save", {})
                if adapter_name in copies:
                    tensor = copies[adapter_name].state_dict(keep_vars=True)[pname]
            ptr = tensor.data_ptr() if tensor.numel() else None
            if ".base_layer." in key:
                owner, pname = key.rsplit(".base_layer.", 1)
                out = f"{owner}.{pname}"
                module = modules[owner]
                if TrainableTokens and isinstance(module, TrainableTokens):
                    raise UserError(
                        "the in-memory engine does not merge trainable-token adapters yet",
                        "merge it in a Python script with PEFT's merge_and_unload",
                    )
                if (
                    isinstance(module, LoraLayer)
                    and pname in ("weight", "bias")
                    and (
                        adapter_name in getattr(module, "lora_A", {})
                        or adapter_name in getattr(module, "lora_embedding_A", {})
                    )
                ):
                    entry: _Entry = ("lora", module, pname)
                else:
                    entry = ("tensor", tensor, None)
            else:
                out = ".".join(key.rsplit(".original_module.", 1))  # modules_to_save: saved under the module's own name
                entry = ("tensor", tensor, None)  # for modules_to_save: the adapter's copy, chosen above
            if ptr is not None and ptr in seen_storage:
                # A tied weight is saved once and tied again by the config on load, unless the adapter changes one
                # side only (LoRA on a tied lm_head or embedding): then both are saved and the merge unties them,
                # so the merged model behaves like the adapter model.
                if entry[0] != "lora" and self.entries[seen_storage[ptr]][0] != "lora":
                    continue
            elif ptr is not None:
                seen_storage[ptr] = out
            self.entries[out] = entry

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        plan = {}
        for name, entry in self.entries.items():
            t = getattr(entry[1].get_base_layer(), entry[2]) if entry[0] == "lora" else entry[1]
            dtype = self.out_dtype if (self.out_dtype is not None and t.is_floating_point()) else t.dtype
            plan[name] = (st_dtype(dtype), tuple(t.shape))
        return plan

    def tensors(
        self, *, safe_merge: bool = False, cancel: CancelToken | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        merged_cache: dict[int, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for name, entry in self.entries.items():
                if cancel is not None:
                    cancel.raise_if_cancelled()
                if entry[0] == "lora":
                    _, layer, pname = entry
                    parts = merged_cache.pop(id(layer), None) or merge_layer_copy(layer, self.adapter_name, safe_merge)
                    t = parts.pop(pname)
                    if parts:
                        merged_cache[id(layer)] = parts
                else:
                    t = entry[1].detach()
                if self.out_dtype is not None and t.is_floating_point() and t.dtype != self.out_dtype:
                    t = t.to(self.out_dtype)
                yield name, t
