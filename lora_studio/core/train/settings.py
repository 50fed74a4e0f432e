"""What a training run is asked to do: the LoRA, the optimiser and the data, with the guide's defaults.

Every field has the default a first run should use (rank 8 on the attention projections, a learning rate
that suits LoRA, loss on the completions only). :meth:`TrainSettings.check` turns a setting that cannot
work into one clear :class:`~lora_studio.core.errors.UserError` before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lora_studio.core.adapters.files import MAX_RANK
from lora_studio.core.errors import UserError
from lora_studio.core.model.quantize import Quantize, check_quantize_choice

# PEFT's init_lora_weights values offered: the plain (Kaiming A, zero B) one and the two that start from the
# base's own structure (OLoRA: QR; PiSSA: SVD), converted on save so the adapter applies to the unmodified base.
INIT_METHODS: tuple[str, ...] = ("default", "gaussian", "olora", "pissa")
CONVERTED_INITS = ("olora", "pissa")  # these rewrite the base weights while training
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
TARGET_PRESETS = ("attention", "all-linear")
MAX_TRAIN_STEPS = 1_000_000  # optimiser steps of one run: weeks on a GPU for a LoRA, so more is a typo

# The guide's advice, shown as tooltips in the window and as --help in the CLI.
ADVICE = {
    "r": "rank of the update B·A; small ranks (4-8) are usually enough and train fastest",
    "alpha": "scale of the update: W' = W + (alpha/r)·B·A; alpha = 2·r is a common start",
    "dropout": "dropout on the LoRA input; a little (0.05) helps against overfitting on small datasets",
    "targets": "the linear layers that get an adapter: attention projections, or every linear layer",
    "init": "OLoRA starts from a QR decomposition of each weight, PiSSA from its SVD; both are saved converted "
    "to a plain LoRA that applies to the unmodified base",
    "rslora": "rank-stabilised LoRA: scales by alpha/sqrt(r), so higher ranks keep learning",
    "dora": "weight-decomposed LoRA: learns a magnitude per output as well (slower, sometimes better)",
    "learning_rate": "LoRA takes larger steps than full fine-tuning: 1e-4 to 3e-4 is typical",
    "epochs": "passes over the training set (ignored when max steps is set)",
    "max_steps": "stop after this many optimiser steps (0: run the epochs)",
    "batch_size": "rows per forward pass; memory grows with batch size x max length",
    "grad_accum": "forward passes per optimiser step: a larger effective batch without more memory",
    "max_length": "tokens per row; longer rows are cut at the end (counted before the run)",
    "warmup_ratio": "fraction of the steps over which the learning rate rises from 0",
    "scheduler": "how the learning rate falls after warm-up",
    "seed": "the same seed, data and settings give the same adapter (on the CPU)",
    "eval_steps": "measure the validation loss every N steps (watch it against overfitting)",
    "save_steps": "write a checkpoint every N steps (Resume continues from any of them)",
    "val_fraction": "share of the training rows held out for validation when no validation file is given",
    "completion_only": "compute the loss on the answers only (not on the prompts); off: on the whole text",
    "patience": "warn about overfitting when the validation loss rose this many evaluations in a row",
    "quantize": "QLoRA: the base's linear weights in 4 bits (nf4, QLoRA's) or 8 (int8) through bitsandbytes while "
    "the adapter trains in the dtype; about a quarter of the weights' memory, a little slower",
}


@dataclass(frozen=True)
class TrainSettings:
    # the adapter
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("attention",)  # a preset name, or module names (q_proj, ...)
    init: str = "default"
    rslora: bool = False
    dora: bool = False
    # the optimiser
    learning_rate: float = 2e-4
    epochs: float = 3.0
    max_steps: int = 0  # 0: run the epochs
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.05
    scheduler: str = "linear"
    seed: int = 42
    eval_steps: int = 10
    save_steps: int = 20
    # the data
    val_fraction: float = 0.1  # used when no validation file is given
    completion_only: bool = True
    # the run
    dtype: str = "float32"
    device: str = "cpu"
    quantize: Quantize | None = None  # QLoRA: the base in nf4, fp4 or int8 (bitsandbytes) while the adapter trains
    patience: int = 3
    keep: str = "best"  # which adapter is saved when validation ran: the best by validation loss, or the last
    baseline: bool = False  # also fine-tune every weight on the same data and steps, for comparison

    def with_changes(self, **changes: Any) -> TrainSettings:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        return cls(**values)

    def check(self) -> None:
        """Raise a UserError naming the first setting that cannot work."""
        if not 1 <= self.r <= MAX_RANK:
            raise UserError(f"rank r={self.r} must be from 1 to {MAX_RANK}", "4-8 is usually enough")
        _finite_positive("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout {self.dropout} must be in [0, 1)", "0.05 is a common choice")
        if not self.targets:
            raise UserError("no target modules chosen", f"pick a preset ({', '.join(TARGET_PRESETS)}) or module names")
        if self.init not in INIT_METHODS:
            raise UserError(f"unknown init {self.init!r}", f"choose one of {', '.join(INIT_METHODS)}")
        if self.dora and self.init in CONVERTED_INITS:
            raise UserError(f"DoRA cannot be combined with {self.init}", "choose the default init for DoRA")
        if not (isinstance(self.learning_rate, float | int) and math.isfinite(self.learning_rate)):
            raise UserError(f"learning rate {self.learning_rate} is not a number", "try 2e-4")
        if self.learning_rate <= 0:
            raise UserError(f"a learning rate of {self.learning_rate:g} trains nothing", "try 2e-4 (1e-4 to 3e-4)")
        if self.max_steps < 0:
            raise UserError(f"max steps {self.max_steps} is negative", "0 runs the epochs")
        if self.max_steps > MAX_TRAIN_STEPS:
            raise UserError(
                f"max steps {self.max_steps:,} is more than {MAX_TRAIN_STEPS:,}", "a LoRA run takes hundreds"
            )
        if self.max_steps == 0:
            _finite_positive("epochs", self.epochs)
        for name in ("batch_size", "grad_accum", "max_length", "eval_steps", "save_steps", "patience"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be at least 1", "")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warm-up ratio {self.warmup_ratio} must be in [0, 1)", "0.05 is a common choice")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}", f"choose one of {', '.join(SCHEDULERS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"validation fraction {self.val_fraction} must be in [0, 1)", "0.1 holds out 10 %")
        if self.keep not in ("best", "last"):
            raise UserError(f"keep {self.keep!r} must be best or last", "")
        if not 0 <= self.seed < 2**32:  # numpy's and the data sampler's range
            raise UserError(f"seed {self.seed} must be a whole number from 0 to {2**32 - 1}", "e.g. 42")
        if self.device.startswith("cuda") or self.device == "mps":
            from lora_studio.core.session import check_device

            check_device(self.device, dtype=self.dtype, quantize=self.quantize)
        if self.quantize is not None:
            self._check_quantize()

    def _check_quantize(self) -> None:
        check_quantize_choice(self.quantize)  # type: ignore[arg-type]  # called when set
        if self.init in CONVERTED_INITS:
            raise UserError(
                f"{self.init} rewrites the base weights, which a {self.quantize} base holds only re-quantised",
                "choose the default init for QLoRA",
            )
        if self.baseline:
            raise UserError(
                f"a full fine-tuning baseline cannot train {self.quantize} weights", "turn off the baseline for QLoRA"
            )


def _finite_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{name} {value} must be a positive number", "")
