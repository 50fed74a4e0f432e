"""Rank reduction: an adapter cut down to rank k by a truncated SVD of each module's update ΔW = s·B·A.

``spectrum`` reads the singular values of every ΔW from the factors alone (core/adapters/inspection.py's QR
trick) and turns them into energy curves and suggested ranks; ``run`` writes the reduced adapter as a standard
PEFT folder (``rank_pattern`` where modules keep different ranks) and measures what the cut costs on a dataset.
"""

from lora_studio.core.reduce.run import ReducedAdapter, ReductionCost, reduce_adapter, reduction_cost
from lora_studio.core.reduce.spectrum import ModuleSpectrum, RankPlan, Suggestion, read_plan

__all__ = [
    "ModuleSpectrum",
    "RankPlan",
    "ReducedAdapter",
    "ReductionCost",
    "Suggestion",
    "read_plan",
    "reduce_adapter",
    "reduction_cost",
]
