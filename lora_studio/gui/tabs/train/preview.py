"""The Train tab's look at the data before a run: its first rows as the model sees them, and the memory estimate.

Both are side jobs (they do not hold the model): the preview reads and tokenizes the data with the base's
tokenizer; the estimate (core ``training_memory``) follows the settings, a moment after they change, and uses
the longest row the preview found.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QLabel, QTextBrowser

from lora_studio.core.errors import ErrorDescription
from lora_studio.core.train import PreviewRow, TrainSettings
from lora_studio.gui.base.ops import PanelHost

if TYPE_CHECKING:
    from lora_studio.core.session import Session, SessionState
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.core.train.data import PreparedData
    from lora_studio.core.train.estimate import TrainingMemory

T = TypeVar("T")
ESTIMATE_DELAY_MS = 400  # from the last change of a setting to the estimate


class PreviewHost(PanelHost, Protocol):
    """What the preview needs of the Train tab (the TrainPanel is one)."""

    @property
    def state(self) -> SessionState: ...
    def inputs(self) -> tuple[str, Path, Path | None, TrainSettings]: ...


def preview_html(rows: list[PreviewRow]) -> str:
    """The rows as the model sees them: the part without loss greyed, the answer in black."""
    out = []
    for row in rows:
        text = "".join(
            f'<span style="color:{"#000" if loss else "#999"}">{html.escape(piece)}</span>'
            for piece, loss in row.pieces
        )
        cut = " · cut at max length" if row.truncated else ""
        out.append(
            f"<p><b>row {row.row}</b> · {row.tokens} tokens{cut}<br><tt>{text.replace(chr(10), '<br>')}</tt></p>"
        )
    return "".join(out) or "<i>no rows</i>"


class DataPreview(QObject):
    """:attr:`preview_view` shows the first rows (:meth:`preview`); :attr:`estimate_label` the memory a run needs."""

    def __init__(self, host: PreviewHost, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.host = host
        self.longest_row: int | None = None  # tokens, from the last preview of this data
        self.memory: TrainingMemory | None = None  # the last estimate of these settings
        self.preview_view = QTextBrowser()
        self.preview_view.setPlaceholderText("Preview data shows the first rows as the model will see them.")
        self.preview_view.setMinimumHeight(60)
        self.estimate_label = QLabel("")
        self.estimate_label.setWordWrap(True)
        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(ESTIMATE_DELAY_MS)
        self._estimate_timer.timeout.connect(self.refresh_estimate)

    def estimate_soon(self) -> None:
        """The settings changed: a new estimate once they rest."""
        self._estimate_timer.start()

    def room_beside_the_session(self) -> bool:
        """Whether the run fits in the memory free now, beside the loaded model (the estimate counts what is
        free): then training, in a process of its own, leaves the window's other work free to run."""
        return self.memory is not None and self.memory.verdict == "fits"

    def preview(self) -> None:
        """Read and tokenize the data (a side job), then show its first rows and the estimate for its longest."""
        base, data, val, settings = self.host.inputs()

        def run(session: Session, *, cancel: CancelToken, report: Report) -> tuple[PreparedData, list[PreviewRow]]:
            from lora_studio.core.model.loading import load_tokenizer
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train import preview
            from lora_studio.core.train.data import prepare_as_set

            tokenizer = load_tokenizer(resolve_source(base))
            prepared = prepare_as_set(settings, data, tokenizer, val, cancel=cancel, report=report)
            return prepared, preview(prepared.train, tokenizer, max_length=settings.max_length)

        def done(result: tuple[PreparedData, list[PreviewRow]]) -> None:
            prepared, rows = result
            self.longest_row = max(len(e.input_ids) for e in prepared.train + prepared.val)
            self.preview_view.setHtml(preview_html(rows))
            note = "; ".join(prepared.warnings)
            self.host.show_message(prepared.summary() + (f" — {note}" if note else ""), "warn" if note else "ok")
            self.refresh_estimate()

        self.host.op("reading the data", run, exclusive=False, key="train-preview").on_success(done).run()

    def refresh_estimate(self) -> None:
        """The memory a run of these settings needs on the loaded base (a side job)."""
        self.memory = None
        if not self.host.state.loaded:
            self.estimate_label.setText("")
            return
        base, _data, _val, settings = self.host.inputs()
        longest = self.longest_row

        def run(session: Session, *, cancel: CancelToken, report: Report) -> TrainingMemory:
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train.estimate import training_memory

            return training_memory(resolve_source(base), settings, longest_row=longest)

        def done(memory: TrainingMemory) -> None:
            self.memory = memory
            mark = "✔" if memory.verdict == "fits" else "✖"
            basis = f"rows up to {longest} tokens" if longest else f"rows of {settings.max_length} tokens"
            self.estimate_label.setText(f"{mark} {memory.summary()} ({basis}; {memory.explanation})")

        def failed(_desc: ErrorDescription) -> None:
            self.estimate_label.setText("")

        (
            self.host.op("estimating memory", run, exclusive=False, key="train-estimate", progress=False)
            .on_success(done)
            .on_failure(failed)
            .run()
        )
