"""Weighted combinations of LoRA adapters, by PEFT's ``add_weighted_adapter``.

The combined adapter is a new adapter on the same PeftModel, so it can be previewed
(generated with, compared) before it is merged and saved, and deleted afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from lora_studio.core.errors import UserError

COMBINATIONS = ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


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
    if combination in NEEDS_DENSITY:
        if density is None:
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
    peft_model,
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
    return new_name
