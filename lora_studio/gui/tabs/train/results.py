"""The end of a training run in the Train tab: what was saved, LoRA against the full baseline, the other weights.

A run whose best and last weights differ saves both; :meth:`ResultSummary.use_alternative` (the "Keep the …
weights instead" button) swaps the other ones into the adapter folder in a job and attaches them anew.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QPushButton

from lora_studio.core.train import TrainResult
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.ops import PanelHost
from lora_studio.gui.tabs.train.chart import format_duration

if TYPE_CHECKING:
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.session_model import SessionModel

T = TypeVar("T")


class ResultHost(PanelHost, Protocol):
    """What the result needs of the Train tab (the TrainPanel is one)."""

    attach: Callable[[str], object]  # attaches the adapter folder at a path to the session

    @property
    def session_model(self) -> SessionModel: ...


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def result_html(result: TrainResult) -> str:
    """What was saved, the run's numbers, LoRA against the baseline (if one ran) and where the other weights are."""
    lora, base = result.lora, result.baseline
    kept_loss = result.kept_val_loss
    lines = [
        f"<b>Saved</b> {html.escape(str(result.adapter))} — {result.kept} weights (step {result.kept_step}"
        + (f", validation loss {kept_loss:.4f}" if kept_loss is not None else "")
        + ")",
        f"{result.data_summary}; {lora.steps} steps in {format_duration(lora.seconds)}; "
        f"{lora.trainable_params:,} trainable parameters",
    ]
    if base is not None:
        lines.append(
            "<table><tr><th>run</th><th>trainable</th><th>best val.</th><th>time</th><th>peak RSS</th></tr>"
            + "".join(
                f"<tr><td>{name}</td><td>{r.trainable_params:,}</td><td>{_loss(r.best_val_loss)}</td>"
                f"<td>{format_duration(r.seconds)}</td><td>{r.peak_rss_bytes / 1024**2:,.0f} MiB</td></tr>"
                for name, r in (("LoRA", lora), ("full", base))
            )
            + "</table>"
        )
    other = result.alternative
    if other is not None:
        lines.append(
            f"The {other.kind} weights (step {other.step}, validation loss {_loss(other.val_loss)}) are saved "
            f"too, in {html.escape(str(other.path))}."
        )
    return "<br>".join(lines)


class ResultSummary:
    """:attr:`summary_label` and :attr:`swap_btn` for the last run's :attr:`result` (None before one ends)."""

    def __init__(self, host: ResultHost) -> None:
        self.host = host
        self.result: TrainResult | None = None
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # at the end of a run whose best and last weights differ: keep the other ones instead
        self.swap_btn = QPushButton("")
        self.swap_btn.clicked.connect(self.use_alternative)
        self.swap_btn.hide()

    def clear(self) -> None:
        """A run starts: no result yet."""
        self.result = None
        self.summary_label.setText("")
        self.swap_btn.hide()

    def show(self, result: TrainResult) -> None:
        self.result = result
        other = result.alternative
        if other is not None:
            self.swap_btn.setText(f"Keep the {other.kind} weights instead")
            self.swap_btn.setToolTip(
                f"swap them into {result.adapter.name} (the {result.kept} weights move to {other.path.name}) "
                "and attach them in place of the current ones"
            )
        self.swap_btn.setVisible(other is not None)
        self.summary_label.setText(result_html(result))

    def use_alternative(self) -> Job | None:
        """The end-of-run choice: the adapter folder gets the other weights (best or last), attached anew."""
        result = self.result
        if result is None or result.alternative is None:
            return None
        adapter, other = result.adapter, result.alternative

        def run(session: Session, *, cancel: CancelToken, report: Report) -> TrainResult:
            from lora_studio.core.train.save import swap_with_alternative

            swap_with_alternative(adapter, other.path)
            for name, attached in list(session.adapters.items()):
                if Path(attached.path) == adapter:
                    session.delete(name)  # its weights are the ones just moved away
            return result.swapped()

        def done(swapped: TrainResult) -> None:
            self.show(swapped)
            self.host.session_model.refresh()
            self.host.show_message(
                f"{adapter.name} now holds the {swapped.kept} weights (step {swapped.kept_step})", "ok"
            )
            self.host.attach(str(adapter))

        return self.host.op("keeping the other weights", run).on_success(done).run()
