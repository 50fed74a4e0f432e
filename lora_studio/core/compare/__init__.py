"""Side-by-side comparison.

Variants (base, adapters, combinations, merged folders) run on the same prompts in one mixed batch, and how far
their outputs diverge.

``variants`` says what a column is (and loads merged folders beside the session),
``runs`` generates every column (mixed-adapter batches, or sequential runs and why),
``divergence`` measures where and how far the columns part from a reference.
"""

from lora_studio.core.compare.divergence import ColumnDivergence, DivergenceReport, TokenScores
from lora_studio.core.compare.runs import (
    BASE,
    MAX_BATCH_ROWS,
    ComparisonResult,
    PromptComparison,
    TokenDelta,
    VariantOutput,
    compare,
    mixed_batch_refusal,
)
from lora_studio.core.compare.variants import BesideModel, Variant, VariantKind, load_beside, session_variants

__all__ = [
    "BASE",
    "MAX_BATCH_ROWS",
    "BesideModel",
    "ColumnDivergence",
    "ComparisonResult",
    "DivergenceReport",
    "PromptComparison",
    "TokenDelta",
    "TokenScores",
    "Variant",
    "VariantKind",
    "VariantOutput",
    "compare",
    "load_beside",
    "mixed_batch_refusal",
    "session_variants",
]
