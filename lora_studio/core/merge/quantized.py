"""Merging an adapter that learned on a quantised base (QLoRA): into which weights, measured rather than guessed.

An adapter trained on a 4-bit (or 8-bit) base learned ΔW against dequant(Wq), not against the checkpoint's W16.
Merging it into W16 adds ΔW to weights that differ from the trained ones by W16 − dequant(Wq), which can be far
larger than ΔW; merging into dequant(Wq) keeps the trained weights but bakes the quantisation error into every
quantised layer. Which is closer to what the user ran depends on the adapter, so both candidates are measured:

* the reference: the adapter on the base quantised exactly as it was trained (bitsandbytes, the same type, block
  size and compute dtype), greedily continuing the verification prompts;
* ``original``: W16 + ΔW, and ``dequantized``: dequant(Wq) + ΔW in the output dtype, on the reference's tokens;
  each candidate's mean KL(reference ‖ candidate) per position;
* per adapted layer, ‖W16 − dequant(Wq)‖ / ‖ΔW‖ (Frobenius norms): how far the quantisation moved the weights the
  adapter learned on, in units of the adapter's own update.

The candidate with the smaller KL is merged (or the one the user names), with the in-memory engine on a
full-precision session whose quantised layers then hold the chosen weights, so the usual verification compares the
saved folder with exactly what was chosen. The output is never quantised again: it is written in the 16/32-bit dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_studio.core._compat import bnb_cpu_unpack
from lora_studio.core.adapters.files import SIDECAR_NAME
from lora_studio.core.errors import UserError
from lora_studio.core.model.quantize import QUANTIZE_CHOICES, Quantize
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch

    from lora_studio.core.session import Session

MergeInto = Literal["auto", "original", "dequantized"]
MERGE_INTO: tuple[MergeInto, ...] = ("auto", "original", "dequantized")
REFERENCE_STAGE = "measuring: the adapter on the quantised base"
CANDIDATE_STAGE = "measuring: merge into {candidate} weights"
WIDE_GAP = 1.0  # a layer whose quantisation error is larger than its adapter's update


@dataclass(frozen=True)
class LayerGap:
    module: str
    gap: float  # ‖W16 − dequant(Wq)‖
    update: float  # ‖ΔW‖

    @property
    def ratio(self) -> float:
        return self.gap / self.update if self.update else math.inf


@dataclass
class MergeTarget:
    """What was measured and chosen; recorded in the card and the result."""

    quantize: str
    compute_dtype: str
    asked: MergeInto
    chosen: Literal["original", "dequantized"]
    kl: dict[str, float] = field(default_factory=dict)  # candidate -> mean KL(reference ‖ candidate); {} unmeasured
    layers: list[LayerGap] = field(default_factory=list)
    tokens: int = 0
    saved_quantised: str | None = None  # a base saved quantised: its folder (the "original" weights are another's)

    def to_json(self) -> dict:
        ratios = [layer.ratio for layer in self.layers]
        return {
            "quantize": self.quantize,
            "compute_dtype": self.compute_dtype,
            "asked": self.asked,
            "chosen": self.chosen,
            "kl": self.kl,
            "tokens": self.tokens,
            "saved_quantised": self.saved_quantised,
            "median_gap_ratio": _median(ratios),
            "layers_gap_above_update": sum(r > WIDE_GAP for r in ratios),
            "layers": [{"module": x.module, "gap": x.gap, "update": x.update, "ratio": x.ratio} for x in self.layers],
        }

    def summary(self) -> str:
        measured = ", ".join(f"KL {name} {value:.3g}" for name, value in self.kl.items())
        how = "measured" if self.asked == "auto" else "asked"
        return f"merged into the {self.chosen} weights ({how}{'; ' + measured if measured else ''})"


def recorded_quantization(adapter: Path) -> dict | None:
    """The quantisation LoRA Studio recorded for the base an adapter was trained on (QLoRA), or None."""
    sidecar = Path(adapter) / SIDECAR_NAME
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = data.get("base") if isinstance(data, dict) else None
    record = base.get("quantization") if isinstance(base, dict) else None
    if isinstance(record, dict) and record.get("type") in QUANTIZE_CHOICES:
        return record
    return None


def check_merge_into(merge_into: str | None, quantize: str | None) -> None:
    if merge_into is None:
        return
    if merge_into not in MERGE_INTO:
        raise UserError(f"unknown merge target {merge_into!r}", f"choose one of {', '.join(MERGE_INTO)}")
    if quantize is None:
        raise UserError(
            f"merging into the {merge_into} weights is for an adapter trained on a quantised base (QLoRA)",
            "this adapter records none: name its base's quantisation (--quantize), or choose auto",
        )


def choose_merge_target(
    session: Session,
    source: ModelSource,
    adapter: Path,
    name: str,
    quantize: Quantize,
    compute_dtype: str,
    merge_into: MergeInto,
    prompts: Sequence[str],
    new_tokens: int,
    *,
    quantised_source: ModelSource | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> MergeTarget:
    """Measure (for ``auto``) and apply the merge target on ``session``: a full-precision session with the adapter
    ``name`` attached and active. Its quantised layers are left holding the chosen base weights. The quantised
    base is ``source`` quantised on load, or ``quantised_source`` as saved (a checkpoint saved quantised, whose
    full-precision folder ``source`` is)."""
    from lora_studio.core.merge.verify import reference_outputs
    from lora_studio.core.session import Session, release_memory

    cancel = cancel or CancelToken()
    quantised = Session()
    with ExitStack() as stack:
        stack.callback(release_memory)
        stack.callback(quantised.close)
        # bitsandbytes must not pack the 4-bit layers for its CPU inference kernel (attaching runs a forward):
        # their weights are dequantised below, from the layout they were quantised in
        stack.enter_context(bnb_cpu_unpack.packing_off())
        if quantised_source is not None:
            report(Progress(0, None, f"loading {quantised_source.label} as saved ({quantize})"))
            quantised.load(quantised_source, dtype=compute_dtype, cancel=cancel, report=report)
        else:
            report(Progress(0, None, f"loading {source.label} in {quantize}"))
            quantised.load(source, dtype=compute_dtype, quantize=quantize, cancel=cancel, report=report)
        quantised.attach(adapter, name, cancel=cancel)
        quantised.activate(name)
        reference = None
        if merge_into == "auto":
            with quantised.lock:
                reference = reference_outputs(
                    quantised.model, quantised.tokenizer, prompts, new_tokens, cancel, _staged(report, REFERENCE_STAGE)
                )
        target = MergeTarget(quantize, compute_dtype, merge_into, "dequantized")
        if quantised_source is not None:
            target.saved_quantised = str(quantised_source.path)
        with session.lock, quantised.lock:
            if reference is not None:
                report(Progress(0, None, CANDIDATE_STAGE.format(candidate="original")))
                target.kl["original"], target.tokens = _mean_kl(session.model, reference, cancel)
            apply = merge_into != "original"
            originals = _dequantise_into(
                session.model, quantised.model, name, target.layers, cancel, apply=apply, keep=merge_into == "auto"
            )
            if reference is not None:
                report(Progress(0, None, CANDIDATE_STAGE.format(candidate="dequantized")))
                target.kl["dequantized"], _ = _mean_kl(session.model, reference, cancel)
                target.chosen = min(("dequantized", "original"), key=lambda c: target.kl[c])
            elif merge_into == "original":
                target.chosen = "original"
            if target.chosen == "original" and originals:
                _restore(session.model, originals)
    return target


def _staged(report: Report, stage: str) -> Report:
    def staged(progress: Progress) -> None:
        report(Progress(progress.done, progress.total, stage, progress.unit))

    return staged


def _mean_kl(model: Any, reference: Any, cancel: CancelToken) -> tuple[float, int]:
    """Mean KL(reference ‖ model) per position over the reference's sequences, and the positions counted."""
    import torch

    total, positions = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for seq, ref_logits in zip(reference.sequences, reference.logits, strict=True):
            cancel.raise_if_cancelled()
            logits = model(input_ids=seq.view(1, -1).to(device)).logits[0].float().cpu()
            ref_logp, logp = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)
            total += float(kl.sum())
            positions += kl.numel()
    return total / max(positions, 1), positions


def _dequantise_into(
    model: Any, quantised: Any, name: str, layers: list[LayerGap], cancel: CancelToken, *, apply: bool, keep: bool
) -> dict[str, torch.Tensor]:
    """For each layer ``name`` adapts, its gap and update norms appended to ``layers``; with ``apply``, every
    quantised layer of ``quantised`` dequantised into the same layer of ``model`` (with ``keep``, its W16 kept in
    the returned dict, to restore: a copy of the quantised layers' weights while the measurement runs)."""
    import torch

    full = dict(model.named_modules())
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module_name, module in quantised.named_modules():
            kind = type(module)
            # bitsandbytes' own layers (PEFT's LoRA wrappers of them share their class names)
            if kind.__name__ not in ("Linear4bit", "Linear8bitLt") or not kind.__module__.startswith("bitsandbytes"):
                continue
            cancel.raise_if_cancelled()
            target = full.get(module_name)
            if target is None:
                raise UserError(f"the full-precision model has no {module_name}", "the two loads differ")
            weight = _base_weight(target)
            dequantised = _dequantised(module).to(weight.dtype)
            if tuple(dequantised.shape) != tuple(weight.shape):
                raise UserError(f"{module_name}: dequantised {tuple(dequantised.shape)}, full {tuple(weight.shape)}")
            wrapper = full.get(module_name.removesuffix(".base_layer"))
            if module_name.endswith(".base_layer") and name in getattr(wrapper, "lora_A", {}):
                delta = wrapper.get_delta_weight(name).float()  # type: ignore[union-attr]
                gap = float((weight.float() - dequantised.float()).norm())
                layers.append(LayerGap(_checkpoint_name(module_name), gap, float(delta.norm())))
            if apply:
                if keep:
                    originals[module_name] = weight.detach().clone()
                weight.copy_(dequantised)
    return originals


def _dequantised(module: Any) -> torch.Tensor:
    """A bitsandbytes layer's weight as its forward uses it, through bitsandbytes' own dequantisers."""
    import bitsandbytes as bnb

    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit layer was packed for bitsandbytes' CPU kernel before it was dequantised")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def _checkpoint_name(module_name: str) -> str:
    """The checkpoint's module name of a PEFT-wrapped one (``base_model.model.X.base_layer`` -> ``X``)."""
    return module_name.removeprefix("base_model.model.").removesuffix(".base_layer")


def _base_weight(module: Any) -> Any:
    return getattr(module, "base_layer", module).weight  # PEFT's LoRA layer wraps the base linear


def _restore(model: Any, originals: dict[str, torch.Tensor]) -> None:
    import torch

    modules = dict(model.named_modules())
    with torch.no_grad():
        for module_name, weight in originals.items():
            _base_weight(modules[module_name]).copy_(weight)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
