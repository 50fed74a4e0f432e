"""Weighted combinations of LoRA adapters, by PEFT's ``add_weighted_adapter``.

The combined adapter is a new adapter on the same PeftModel, so it can be previewed
(generated with, compared) before it is merged and saved, and deleted afterwards.

Each combination type asks something of its adapters (PEFT's ``_check_add_weighted_adapter``
and what it silently drops): :func:`combination_refusal` says so from the adapters' configs
alone, before anything is loaded, and :func:`fitting_combination` picks a type that works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_studio.core.errors import UserError

if TYPE_CHECKING:
    from peft import PeftModel

COMBINATIONS = ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
# PEFT stacks these per layer: every adapter needs the same rank, which the result keeps
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DEFAULT_COMBINATION = "cat"  # exact (the weighted sum of the updates), any ranks; the result's rank is their sum
MAX_WEIGHT = 4.0  # as the largest scale of one adapter (session.MAX_SCALE); negative weights subtract an adapter
RANK_KEEPING_FALLBACK = "svd"  # any ranks; keeps the largest rank (a truncated SVD of the weighted sum)


@dataclass(frozen=True)
class CombinationMember:
    """What a combination type needs to know about one adapter (from its config; nothing is loaded)."""

    name: str
    r: int
    rank_pattern: tuple[tuple[str, int], ...] = ()
    regex_targets: bool = False  # target_modules is a regex string (PEFT cannot mix it with a list)
    full_modules: tuple[str, ...] = ()  # modules_to_save / trainable tokens: trained in full, not low-rank
    use_dora: bool = False
    target_parameters: bool = False

    @property
    def max_rank(self) -> int:
        return max([self.r, *(r for _, r in self.rank_pattern)])

    @property
    def rank_text(self) -> str:
        return f"r={self.r}" + (" with per-layer ranks" if self.rank_pattern else "")


def member_from_config(name: str, config: Any) -> CombinationMember:
    """From core.adapters.files.AdapterConfig or a peft LoraConfig (the same field names)."""
    full = list(getattr(config, "modules_to_save", None) or [])
    if getattr(config, "trainable_token_indices", None):
        full.append("trainable tokens")
    pattern: Mapping[str, Any] = getattr(config, "rank_pattern", None) or {}
    return CombinationMember(
        name=name,
        r=int(config.r),
        rank_pattern=tuple(sorted((str(k), int(v)) for k, v in pattern.items())),
        regex_targets=isinstance(getattr(config, "target_modules", None), str),
        full_modules=tuple(full),
        use_dora=bool(getattr(config, "use_dora", False)),
        target_parameters=bool(getattr(config, "target_parameters", None) or _raw(config).get("target_parameters")),
    )


def _raw(config: Any) -> dict:
    raw = getattr(config, "raw", None)
    return raw if isinstance(raw, dict) else {}


def combined_rank(members: Sequence[CombinationMember], combination: str) -> int:
    """The rank of the combined adapter (PEFT's rule)."""
    ranks = [m.max_rank for m in members]
    if combination == "cat":
        return sum(ranks)
    return max(ranks)


def combination_refusal(members: Sequence[CombinationMember], combination: str) -> tuple[str, str] | None:
    """Why PEFT cannot combine these adapters with ``combination`` (or would silently lose part of them):
    (one line, hint), or None when it can."""
    if len(members) < 2 or combination not in COMBINATIONS:
        return None  # a single adapter is merged plainly; an unknown type is check_combination's
    for m in members:
        if m.target_parameters:
            return (
                f"PEFT cannot combine {m.name}: it targets parameters (target_parameters), "
                "which add_weighted_adapter does not support",
                "merge it on its own",
            )
        if m.use_dora:
            return (
                f"PEFT cannot combine {m.name}: it is a DoRA adapter, and add_weighted_adapter combines the low-rank "
                "parts only (its magnitude vector would be lost)",
                "merge the DoRA adapter on its own",
            )
        if m.full_modules:
            return (
                f"PEFT cannot combine {m.name}: it also trains {', '.join(m.full_modules)} in full "
                "(modules_to_save), which add_weighted_adapter leaves out of a combination",
                "merge that adapter on its own",
            )
    if len({m.regex_targets for m in members}) > 1:
        regex = next(m.name for m in members if m.regex_targets)
        listed = next(m.name for m in members if not m.regex_targets)
        return (
            f"PEFT cannot combine these adapters: {regex} names its target modules by a regex, {listed} by a list",
            "re-save one of them with the other kind of target_modules",
        )
    if combination in EQUAL_RANKS and len({(m.r, m.rank_pattern) for m in members}) > 1:
        ranks = ", ".join(f"{m.name} {m.rank_text}" for m in members)
        return (
            f"PEFT cannot combine these adapters with {combination}: it needs adapters of the same rank ({ranks})",
            f"use cat (exact, rank {combined_rank(members, 'cat')}) "
            f"or svd (keeps rank {combined_rank(members, 'svd')})",
        )
    return None


def check_members(members: Sequence[CombinationMember], combination: str | None) -> None:
    """Raise the UserError of :func:`combination_refusal`, if any."""
    refusal = combination_refusal(members, combination) if combination is not None else None
    if refusal is not None:
        raise UserError(*refusal)


def fitting_combination(members: Sequence[CombinationMember], preferred: str | None = None) -> str:
    """A combination type that works for ``members``: ``preferred`` when it does; else ``svd`` for a type that keeps
    the rank (linear, ties, dare_*, magnitude_prune) when the ranks differ; else ``cat``."""
    if preferred in COMBINATIONS and combination_refusal(members, preferred) is None:
        return preferred
    if preferred in EQUAL_RANKS and combination_refusal(members, RANK_KEEPING_FALLBACK) is None:
        return RANK_KEEPING_FALLBACK
    return DEFAULT_COMBINATION


def check_combination(
    names: Sequence[str], weights: Sequence[float], combination: str | None, density: float | None
) -> None:
    """Validate the request before anything is loaded; raises UserError."""
    if combination is None:
        if len(names) > 1:
            raise UserError(
                f"{len(names)} adapters given but no combination type", f"add --combination ({', '.join(COMBINATIONS)})"
            )
        if weights and list(weights) != [1.0] * len(weights):
            raise UserError("weights apply to a combination of adapters", "add --combination, or drop --weights")
        return
    if combination not in COMBINATIONS:
        raise UserError(f"unknown combination type {combination!r}", f"choose one of {', '.join(COMBINATIONS)}")
    if len(weights) != len(names):
        raise UserError(
            f"{len(weights)} weights for {len(names)} adapters", "give one weight per adapter, e.g. --weights 0.7,0.3"
        )
    for w in weights:
        if not (w == w) or abs(w) == float("inf"):
            raise UserError(f"weight {w} is not a finite number", "use numbers like 0.5")
        if abs(w) > MAX_WEIGHT:  # a single adapter's scale stops at 4 too; beyond it the model is noise
            raise UserError(f"weight {w:g} is outside -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}", "use weights like 0.7,0.3")
    if combination in NEEDS_DENSITY and density is None:
        raise UserError(f"the {combination} combination needs a density", "add --density, e.g. --density 0.5")
    if density is not None:
        if combination not in NEEDS_DENSITY:
            raise UserError(
                f"density does not apply to the {combination} combination",
                f"drop --density, or use one of {', '.join(NEEDS_DENSITY)}",
            )
        if not 0.0 < density <= 1.0:
            raise UserError(f"density {density} is outside (0, 1]", "use a fraction like 0.5")


def add_combination(
    peft_model: PeftModel,
    names: Sequence[str],
    weights: Sequence[float],
    combination: str,
    density: float | None = None,
    new_name: str = "combined",
    seed: int = 0,
) -> str:
    """Add the weighted combination as adapter ``new_name`` (replacing one of that name); returns its name."""
    import torch

    check_combination(names, weights, combination, density)
    missing = [n for n in names if n not in peft_model.peft_config]
    if missing:
        raise UserError(f"adapter {missing[0]!r} is not attached", "attach it before combining")
    check_members([member_from_config(n, peft_model.peft_config[n]) for n in names], combination)
    if new_name in peft_model.peft_config:
        peft_model.delete_adapter(new_name)
    kwargs = {"density": density} if density is not None else {}
    # dare_* drop entries at random: a fixed seed makes a combination reproducible.
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        peft_model.add_weighted_adapter(
            list(names), [float(w) for w in weights], new_name, combination_type=combination, **kwargs
        )
    except (ValueError, RuntimeError, TypeError) as exc:
        raise UserError(
            f"PEFT cannot combine these adapters with {combination}: {' '.join(str(exc).split())[:300]}",
            "linear and the ties/dare/magnitude_prune types need adapters of the same rank; try cat or svd",
        ) from exc
    finally:
        torch.random.set_rng_state(state)
    _plain_scaling(peft_model, new_name)
    return new_name


def _plain_scaling(peft_model: Any, name: str) -> None:
    """The combined adapter's layers hold the scaled update already (scaling 1 = lora_alpha / r, PEFT's intent);
    PEFT copies ``use_rslora`` from the first adapter, which would scale it again by sqrt(r)."""
    config = peft_model.peft_config[name]
    if not getattr(config, "use_rslora", False):
        return
    config.use_rslora = False
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and name in scaling:
            module.scaling[name] = 1.0
