"""Merging adapters into their base.

The plan (engine, dtype, memory and disk), the streaming and in-memory engines, verification against the adapter,
and the model card.

``plan`` says what a merge needs and whether it may start (headers only), ``run``
merges and saves (``merge_and_save``, dispatching to the ``streaming`` or
``in_memory`` engine), ``outputs`` writes the config, tokenizer and model card
(``model_card``), ``verify`` proves the saved folder against the adapter model;
``combined_adapter`` saves a weighted combination as an adapter folder without merging.
"""

from lora_studio.core.merge.combined_adapter import SavedCombination, save_combination
from lora_studio.core.merge.plan import (
    DTYPES,
    ENGINES,
    AdapterSpec,
    EngineName,
    EnginePrediction,
    MergeOptions,
    MergePlan,
    base_dtype,
    plan_merge,
)
from lora_studio.core.merge.run import COMBINED_NAME, MergeResult, merge_and_save
from lora_studio.core.merge.verify import Verification, VerificationStatus

__all__ = [
    "COMBINED_NAME",
    "DTYPES",
    "ENGINES",
    "AdapterSpec",
    "EngineName",
    "EnginePrediction",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "SavedCombination",
    "Verification",
    "VerificationStatus",
    "base_dtype",
    "merge_and_save",
    "plan_merge",
    "save_combination",
]
