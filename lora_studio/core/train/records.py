"""What a training run is asked (:class:`TrainRequest`), reports as it goes (:class:`TrainMetrics`) and measured
(:class:`RunRecord`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_studio.core.model.sources import ModelSource
from lora_studio.core.train.settings import TrainSettings

INITIAL_ADAPTER = "initial-adapter"  # the OLoRA/PiSSA starting point, needed to convert the result on save


def checkpoints_beside(out: Path) -> Path:
    """Where a run into ``out`` keeps its checkpoints until it ends (a stopped run leaves them there)."""
    return out.parent / f"{out.name}.checkpoints"


@dataclass(frozen=True)
class TrainRequest:
    base: ModelSource
    train_file: Path
    out: Path
    settings: TrainSettings = field(default_factory=TrainSettings)
    val_file: Path | None = None
    resume: Path | None = None  # a checkpoint-N folder to continue from
    overwrite: bool = False
    trust_remote_code: bool = False

    @property
    def checkpoints(self) -> Path:
        if self.resume is not None:
            return Path(self.resume).expanduser().absolute().parent
        return checkpoints_beside(Path(self.out).expanduser().absolute())


@dataclass(frozen=True)
class TrainMetrics:
    """One point for the live view, sent from the worker thread as the run goes."""

    step: int
    total_steps: int
    run: str = "lora"  # "lora", or "full" for the full fine-tuning baseline
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    warning: str = ""  # the overfitting warning, once, when it first holds


OnMetrics = Callable[[TrainMetrics], None]


def no_metrics(_: TrainMetrics) -> None:
    pass


@dataclass
class RunRecord:
    """What one trainer run measured: the loss rows, the best evaluation, time and peak memory."""

    run: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # step, train_loss, val_loss, lr, elapsed_s, ...
    best_step: int | None = None
    best_val_loss: float | None = None
    best_state: dict[str, Any] | None = None
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    peak_rss_bytes: int = 0
    peak_accelerator_bytes: int = 0
    trainable_params: int = 0
    total_params: int = 0
    overfitting: str = ""
    nan_at: int | None = None

    @property
    def last_train_loss(self) -> float | None:
        return next((r["train_loss"] for r in reversed(self.rows) if r.get("train_loss") is not None), None)

    @property
    def last_val_loss(self) -> float | None:
        return next((r["val_loss"] for r in reversed(self.rows) if r.get("val_loss") is not None), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "final_train_loss": self.last_train_loss,
            "final_val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "trainable_params": self.trainable_params,
            "trainable_percent": round(100 * self.trainable_params / self.total_params, 4)
            if self.total_params
            else None,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_accelerator_bytes": self.peak_accelerator_bytes,
        }
