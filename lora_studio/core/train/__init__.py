"""Training LoRA adapters with TRL's SFTTrainer: data, settings, the job, the saved folder."""

from lora_studio.core.train.data import PreparedData, PreviewRow, prepare, preview, read_rows
from lora_studio.core.train.records import RunRecord, TrainMetrics, TrainRequest
from lora_studio.core.train.run import (
    SavedWeights,
    TrainResult,
    linear_module_names,
    train_adapter,
    train_in_worker_process,
)
from lora_studio.core.train.settings import ADVICE, INIT_METHODS, SCHEDULERS, TARGET_PRESETS, TrainSettings

__all__ = [
    "ADVICE",
    "INIT_METHODS",
    "SCHEDULERS",
    "TARGET_PRESETS",
    "PreparedData",
    "PreviewRow",
    "RunRecord",
    "SavedWeights",
    "TrainMetrics",
    "TrainRequest",
    "TrainResult",
    "TrainSettings",
    "linear_module_names",
    "prepare",
    "preview",
    "read_rows",
    "train_adapter",
    "train_in_worker_process",
]
