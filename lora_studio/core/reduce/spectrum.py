"""The singular values of every module's update, as energy curves and suggested ranks.

The energy a rank-k truncation keeps is Σ_{i<k} σᵢ² / Σ σᵢ² (Eckart–Young: the truncated SVD is the best
rank-k approximation, and 1 − energy is its squared relative Frobenius error). A *uniform* rank keeps the same
k in every module; an *energy* target picks, per module, the smallest k that keeps that share of the module's
energy, so modules whose update is nearly low-rank shrink most.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.files import AdapterConfig, LoraModuleKeys
from lora_studio.core.adapters.inspection import delta_spectrum, natural_key
from lora_studio.core.errors import UserError

ENERGY_TARGETS = (0.90, 0.95, 0.99)
# Inits whose adapter is relative to a base they changed (unless PEFT converted it on save): cutting its
# factors would not cut an update of the user's base.
_BASE_CHANGING_INITS = ("olora", "pissa", "corda", "loftq")


@dataclass(frozen=True)
class ModuleSpectrum:
    module: str
    kind: str  # "linear" | "embedding"
    in_features: int
    out_features: int
    r: int
    scaling: float
    singular_values: list[float]  # of s·B·A, largest first

    @property
    def total_energy(self) -> float:
        return sum(s * s for s in self.singular_values)

    def cumulative(self) -> list[float]:
        """Energy kept at rank 1..r, as fractions (1.0 at r; all 1.0 for a zero update)."""
        total = self.total_energy
        out, acc = [], 0.0
        for s in self.singular_values:
            acc += s * s
            out.append(acc / total if total > 0 else 1.0)
        return out

    def energy_at(self, k: int) -> float:
        return 1.0 if k >= self.r else self.cumulative()[k - 1] if k > 0 else 0.0

    def rank_for_energy(self, target: float) -> int:
        """The smallest rank keeping ``target`` of this module's energy (at least 1: PEFT has no rank 0)."""
        curve = self.cumulative()
        return min(self.r, bisect.bisect_left(curve, target - 1e-12) + 1)

    def params_at(self, k: int) -> int:
        return k * (self.in_features + self.out_features)


@dataclass(frozen=True)
class Suggestion:
    energy: float  # the target share of energy
    uniform_rank: int  # one rank for every module keeping that share of the adapter's total energy
    uniform_params: int
    per_module_params: int  # every module at its own rank for the target
    per_module_max_rank: int

    def to_json(self) -> dict[str, Any]:
        return {
            "energy": self.energy,
            "uniform_rank": self.uniform_rank,
            "uniform_params": self.uniform_params,
            "per_module_params": self.per_module_params,
            "per_module_max_rank": self.per_module_max_rank,
        }


@dataclass
class RankPlan:
    """An adapter's spectra and what each cut would keep."""

    name: str
    path: Path
    config: AdapterConfig
    modules: list[ModuleSpectrum]
    keys: dict[str, LoraModuleKeys] = field(repr=False)

    @property
    def r(self) -> int:
        return max((m.r for m in self.modules), default=self.config.r)

    @property
    def params(self) -> int:
        return sum(m.params_at(m.r) for m in self.modules)

    def energy_kept(self, ranks: dict[str, int]) -> float:
        """The share of the adapter's total energy (summed over modules) that ``ranks`` (module -> k) keeps."""
        total = sum(m.total_energy for m in self.modules)
        if total <= 0:
            return 1.0
        return sum(m.energy_at(ranks[m.module]) * m.total_energy for m in self.modules) / total

    def params_kept(self, ranks: dict[str, int]) -> int:
        return sum(m.params_at(ranks[m.module]) for m in self.modules)

    def least_kept(self, ranks: dict[str, int]) -> tuple[str, float]:
        """The module keeping the smallest share of its own energy under ``ranks``, and that share."""
        return min(((m.module, m.energy_at(ranks[m.module])) for m in self.modules), key=lambda item: item[1])

    def uniform_energy(self, k: int) -> float:
        """The share of the adapter's total energy kept with rank k everywhere."""
        return self.energy_kept({m.module: k for m in self.modules})

    def uniform_rank_for(self, target: float) -> int:
        for k in range(1, self.r + 1):
            if self.uniform_energy(k) >= target - 1e-12:
                return k
        return self.r

    def ranks(self, *, rank: int | None = None, energy: float | None = None) -> dict[str, int]:
        """The rank each module keeps: ``rank`` everywhere (never above its own), or per module for ``energy``."""
        if (rank is None) == (energy is None):
            raise UserError("give a rank or an energy target, not both", "e.g. --rank 4 or --energy 0.95")
        if rank is not None:
            check_rank(rank)
            return {m.module: min(rank, m.r) for m in self.modules}
        assert energy is not None
        check_energy(energy)
        return {m.module: m.rank_for_energy(energy) for m in self.modules}

    def suggestions(self) -> list[Suggestion]:
        out = []
        for target in ENERGY_TARGETS:
            k = self.uniform_rank_for(target)
            per = self.ranks(energy=target)
            out.append(
                Suggestion(
                    target,
                    k,
                    self.params_kept(self.ranks(rank=k)),
                    self.params_kept(per),
                    max(per.values(), default=0),
                )
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "r": self.r,
            "params": self.params,
            "suggestions": [s.to_json() for s in self.suggestions()],
            "uniform_energy": [self.uniform_energy(k) for k in range(1, self.r + 1)],
            "modules": [
                {
                    "module": m.module,
                    "r": m.r,
                    "singular_values": m.singular_values,
                    "energy": m.cumulative(),
                }
                for m in self.modules
            ],
        }


def rank_text(ranks: dict[str, int]) -> str:
    """ "7", or "1–7 per module" when the modules keep different ranks."""
    values = sorted(set(ranks.values()))
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]} per module"


def check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"rank {rank!r} is not a positive whole number", "e.g. --rank 4")
    return rank


def check_energy(energy: float) -> float:
    if not 0.0 < energy <= 1.0:
        raise UserError(f"energy {energy!r} is not a share between 0 and 1", "e.g. --energy 0.95 (95 %)")
    return energy


def read_plan(folder: Path, *, name: str | None = None) -> RankPlan:
    """The spectra of every LoRA module of the adapter in ``folder``; refuses adapters a cut cannot keep exact."""
    folder = adapter_files.check_adapter_folder(Path(folder))
    config = adapter_files.read_adapter_config(folder)
    label = name or folder.name
    if config.peft_type != "LORA":
        raise UserError(f"{label} is a {config.peft_type} adapter", "rank reduction works on LoRA adapters")
    if config.use_dora:
        raise UserError(
            f"{label} is a DoRA adapter: its magnitudes depend on the whole update",
            "rank reduction works on plain LoRA adapters",
        )
    init = str(config.recorded_init or config.init_lora_weights).lower()
    if init.startswith(_BASE_CHANGING_INITS) and not config.converted_to_lora and config.init_lora_weights is not True:
        raise UserError(
            f"{label} was initialised with {init} and not converted: its factors belong to a changed base",
            "save it converted (PEFT's path_initial_model_for_weight_conversion) and reduce that",
        )
    tensors = adapter_files.load_tensors(folder)
    adapter_files.check_finite(tensors, folder)
    lay = adapter_files.layout(tensors)
    modules: list[ModuleSpectrum] = []
    keys: dict[str, LoraModuleKeys] = {}
    for module, entry in sorted(lay.lora.items(), key=lambda item: natural_key(item[0])):
        if entry.a is None or entry.b is None:
            continue
        a, b = tensors[entry.a], tensors[entry.b]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(
                f"{label}: {module} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}",
                "the adapter is damaged; these are not LoRA factors",
            )
        rank = config.rank_for(module)
        if a.shape[0] != rank:
            raise UserError(
                f"{label}: {module} has rank {a.shape[0]} in its tensors but {rank} in adapter_config.json",
                "the config does not belong to these weights; re-save the adapter",
            )
        scaling = config.scaling_for(module)
        modules.append(
            ModuleSpectrum(
                module,
                entry.kind,
                int(a.shape[1]),
                int(b.shape[0]),
                int(a.shape[0]),
                scaling,
                delta_spectrum(a, b, scaling),
            )
        )
        keys[module] = entry
    if not modules:
        raise UserError(f"{label} has no LoRA factors", "nothing to reduce")
    return RankPlan(label, folder, config, modules, keys)
