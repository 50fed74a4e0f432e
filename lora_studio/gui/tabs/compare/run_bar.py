"""The Compare tab's run bar: Run, Run all prompts, Stop, Share, the job's progress and a note on the run.

Widgets only: the panel connects the buttons and says how a run went through :meth:`RunBar.show_summary`.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QSizePolicy, QToolButton, QWidget

# "generating: 270/768 tokens" is whole from about 200 pixels; below, the bar elides it (its tooltip has it all): the
# tab stays narrow enough for a 1000-pixel window beside the Base model column
PROGRESS_MIN_WIDTH = 110


class RunBar(QWidget):
    """One row above the columns; ``share`` and ``progress`` are the panel's, placed here."""

    def __init__(self, share: QToolButton, progress: QProgressBar, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_btn = QPushButton("Run")
        self.run_btn.setDefault(True)
        self.run_all_btn = QPushButton("Run all prompts")
        self.stop_btn = QPushButton("Stop")
        self.note = QLabel("")
        self.note.setStyleSheet("color: palette(mid);")
        self.note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # a long note (a sequential run's reason) is cut, not allowed to widen the tab; the tooltip has it all
        self.note.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        progress.setMinimumWidth(PROGRESS_MIN_WIDTH)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        for button in (self.run_btn, self.run_all_btn, self.stop_btn, share):
            row.addWidget(button)
        row.addWidget(progress, 1)
        row.addWidget(self.note, 2)

    def show_summary(self, note: str, tooltip: str) -> None:
        """How the shown prompt's run went, in full in the tooltip."""
        self.note.setText(note)
        self.note.setToolTip(tooltip)
