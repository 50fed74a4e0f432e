"""The trainer's hooks into LoRA Studio: progress, Stop, live metrics, the best evaluation, NaN and overfitting.

One ``transformers.TrainerCallback``; it does no work of its own beyond reading the trainer's logs, so it
costs the run next to nothing (``benchmarks/bench_train.py`` measures it against a plain TRL run).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from lora_studio.core.tasks import CancelToken, Progress, Report
from lora_studio.core.train.records import OnMetrics, RunRecord, TrainMetrics

if TYPE_CHECKING:
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lora_studio.core.train.settings import TrainSettings


def finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class StudioCallback(TrainerCallback):
    def __init__(
        self, record: RunRecord, settings: TrainSettings, cancel: CancelToken, report: Report, on_metrics: OnMetrics
    ) -> None:
        self.record, self.settings, self.cancel, self.report, self.on_metrics = (
            record,
            settings,
            cancel,
            report,
            on_metrics,
        )
        self.total_steps = 0  # known before the trainer's state is: for the evaluation before the first step
        self._start = time.monotonic()
        self._first_step: int | None = None  # the step this process started from (a resumed run starts later)
        self._first_step_time = 0.0
        self._first_tokens = 0
        self._rows: dict[int, dict[str, Any]] = {}
        self._val_history: list[tuple[float, float | None]] = []  # (val loss, train loss around it)
        self._model: Any = None
        self._pid_rss = _rss_reader()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _row(self, step: int) -> dict[str, Any]:
        row = self._rows.get(step)
        if row is None:
            row = self._rows[step] = {"step": step, "train_loss": None, "val_loss": None, "lr": None}
            self.record.rows.append(row)
        return row

    def _elapsed(self) -> float:
        return time.monotonic() - self._start

    def _eta(self, step: int, total: int) -> float | None:
        if self._first_step is None or step <= self._first_step + 1:
            return None  # after the first steps: the first one pays for warm-up
        rate = (time.monotonic() - self._first_step_time) / (step - self._first_step - 1)
        return max(0.0, rate * (total - step))

    def _tokens_per_s(self, state: Any) -> float | None:
        seen = getattr(state, "num_input_tokens_seen", 0) or 0
        if self._first_step is None or seen <= self._first_tokens:
            return None
        spent = time.monotonic() - self._first_step_time
        return (seen - self._first_tokens) / spent if spent > 0 else None

    def restore_history(self, checkpoint: Path) -> None:
        """A resumed run's earlier points, from the checkpoint's trainer_state.json, so its loss CSV is whole."""
        try:
            history = json.loads((checkpoint / "trainer_state.json").read_text("utf-8")).get("log_history", [])
        except (OSError, ValueError, AttributeError):
            return
        for entry in history:
            step = entry.get("step")
            if not isinstance(step, int):
                continue
            if "loss" in entry:
                row = self._row(step)
                row["train_loss"], row["lr"] = finite(entry["loss"]), finite(entry.get("learning_rate"))
            if "eval_loss" in entry and (val := finite(entry["eval_loss"])) is not None:
                self._row(step)["val_loss"] = val
                self._val_history.append((val, self.record.last_train_loss))
                # the best weights of a step before the resume are not in memory: "best" then means the best
                # seen since, unless none beats this one (then the last weights are kept)
                self._is_new_best(step, val)

    def _report_steps(self, state: TrainerState) -> None:
        what = "training" if self.record.run == "lora" else "full fine-tuning baseline"
        self.report(Progress(state.global_step, state.max_steps, what, "steps"))

    # -- the hooks -------------------------------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        self._model = model
        # the validation loss before any step was taken by an evaluate() before train(), whose fresh state has no
        # record of it: put it in the state's history, so every checkpoint carries it and a resumed run's CSV too
        start = self._rows.get(0, {}).get("val_loss")
        if state.global_step == 0 and start is not None and not any(e.get("step") == 0 for e in state.log_history):
            state.log_history.insert(0, {"eval_loss": start, "step": 0, "epoch": 0.0})
        # "0/N steps" until the first step ends (minutes for a big model on a CPU), not the data's finished count
        self._report_steps(state)
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        step = state.global_step
        if self._first_step is None:
            self._first_step, self._first_step_time = step, time.monotonic()
            self._first_tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        self.record.steps = step
        self.record.peak_rss_bytes = max(self.record.peak_rss_bytes, self._pid_rss())
        self.record.peak_accelerator_bytes = max(self.record.peak_accelerator_bytes, _accelerator_peak())
        self._report_steps(state)
        if self.cancel.cancelled:
            control.should_training_stop = True
            control.should_save = self.record.run == "lora"  # a checkpoint to resume from
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        logs = logs or {}
        step, total = state.global_step, state.max_steps
        if "loss" in logs:
            loss = logs["loss"]
            row = self._row(step)
            row["train_loss"] = finite(loss)
            row["lr"] = finite(logs.get("learning_rate"))
            row["elapsed_s"] = round(self._elapsed(), 2)
            if row["train_loss"] is None:
                self.record.nan_at = step
                control.should_training_stop = True
                return control
            tokens_per_s = self._tokens_per_s(state)
            row["tokens_per_s"] = round(tokens_per_s, 1) if tokens_per_s else None
            self.on_metrics(
                _metrics(self.record.run, step, total, row, self._elapsed(), self._eta(step, total), tokens_per_s)
            )
        if "train_runtime" in logs:
            self.record.seconds = float(logs["train_runtime"])
            self.record.tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)  # over train_runtime
        return control

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        self._on_eval(state.global_step, metrics or {}, state.max_steps or self.total_steps)
        return control

    def _on_eval(self, step: int, metrics: dict, total: int) -> None:
        val = finite(metrics.get("eval_loss"))
        if val is None:
            return
        row = self._row(step)
        row["val_loss"] = val
        record = self.record
        if self._is_new_best(step, val) and record.run == "lora" and self._model is not None:
            from peft import get_peft_model_state_dict

            record.best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self._model).items()}
        warning = self._overfitting(val, record.last_train_loss)
        self.on_metrics(
            TrainMetrics(
                step,
                total,
                record.run,
                val_loss=val,
                elapsed_s=self._elapsed(),
                eta_s=self._eta(step, total),
                warning=warning,
            )
        )

    def _is_new_best(self, step: int, val: float) -> bool:
        """Record ``val`` as the best validation loss when it is one (the loss before any step does not count)."""
        record = self.record
        if step > 0 and (record.best_val_loss is None or val < record.best_val_loss):
            record.best_val_loss, record.best_step = val, step
            return True
        return False

    def _overfitting(self, val: float, train: float | None) -> str:
        """The warning, the first time the validation loss rose K evaluations in a row while training fell."""
        self._val_history.append((val, train))
        k = self.settings.patience
        if self.record.overfitting or len(self._val_history) < k + 1:
            return ""
        window = self._val_history[-(k + 1) :]
        vals = [v for v, _ in window]
        trains = [t for _, t in window if t is not None]
        rising = all(b > a for a, b in itertools.pairwise(vals))
        falling = len(trains) >= 2 and trains[-1] < trains[0]
        if rising and falling:
            best = (
                f" (best: step {self.record.best_step}, {self.record.best_val_loss:.4f})"
                if self.record.best_step
                else ""
            )
            self.record.overfitting = (
                f"overfitting: the validation loss rose {k} evaluations in a row while the training loss fell{best}"
            )
            return self.record.overfitting
        return ""


def _metrics(
    run: str, step: int, total: int, row: dict, elapsed: float, eta: float | None, tokens_per_s: float | None
) -> TrainMetrics:
    return TrainMetrics(
        step,
        total,
        run,
        train_loss=row["train_loss"],
        learning_rate=row["lr"],
        tokens_per_s=tokens_per_s,
        elapsed_s=elapsed,
        eta_s=eta,
    )


def _rss_reader() -> Callable[[], int]:
    import psutil

    process = psutil.Process()
    return lambda: int(process.memory_info().rss)


def _accelerator_peak() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0
