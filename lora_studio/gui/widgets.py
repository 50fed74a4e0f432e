"""Small shared pieces: a message line that states one result, progress bars fed from core Progress."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QProgressBar

from lora_studio.core.tasks import Progress

STYLES = {
    "ok": "color: #2a7a2a;",
    "warn": "color: #b35900;",
    "error": "color: #c0392b; font-weight: bold;",
    "info": "",
}


class MessageLine(QLabel):
    """One line saying what just happened; errors in red, never a dialog."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.kind = "info"

    def show_message(self, text: str, kind: str = "info") -> None:
        self.kind = kind
        self.setStyleSheet(STYLES.get(kind, ""))
        self.setText(text)
        self.setToolTip(text)


def job_progress_bar() -> QProgressBar:
    """A progress bar that is hidden between jobs but keeps its place in the layout.

    Showing a bar that took no space re-lays out its panel when a job starts and ends: every chart
    beside it is resized and repainted (pyqtgraph calls back into Python for each), which beside a
    busy worker stalled the window by 50-70 ms.
    """
    bar = QProgressBar()
    policy = bar.sizePolicy()
    policy.setRetainSizeWhenHidden(True)
    bar.setSizePolicy(policy)
    reset_progress(bar)
    bar.hide()
    return bar


def show_progress(bar: QProgressBar, progress: Progress) -> None:
    """Determinate when the work is countable, a busy bar when not."""
    fraction = progress.fraction
    if fraction is None:
        bar.setRange(0, 0)
        bar.setFormat(progress.message)
    else:
        bar.setRange(0, 1000)
        bar.setValue(int(fraction * 1000))
        total = int(progress.total or 0)
        unit = f" {progress.unit}" if progress.unit else ""
        bar.setFormat(f"{progress.message}: {int(progress.done):,}/{total:,}{unit}")
    bar.setTextVisible(True)
    bar.setToolTip(bar.format())


def reset_progress(bar: QProgressBar) -> None:
    bar.setRange(0, 1000)
    bar.setValue(0)
    bar.setFormat("")
    bar.setToolTip("")
