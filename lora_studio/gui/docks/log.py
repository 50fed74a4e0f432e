"""The log: every job's start and end, and the full story behind each one-line error."""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont, QTextCursor
from PySide6.QtWidgets import QHBoxLayout, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

from lora_studio.gui.base.widgets import ElidedLabel

# Old lines scroll away instead of growing without bound. Each line shown costs ~7 KiB (Qt's text layout of it, kept by
# QPlainTextEdit), so the dock holds a few sessions' jobs, ~7 MiB; the log file keeps every line.
MAX_BLOCKS = 1000
_LEVELS = {
    "info": logging.INFO,
    "ok": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "debug": logging.DEBUG,
}
logger = logging.getLogger(__name__)


class LogPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = QPlainTextEdit(readOnly=True)
        self.text.setMaximumBlockCount(MAX_BLOCKS)
        font = QFont("monospace")
        font.setStyleHint(QFont.StyleHint.Monospace)
        font.setPointSizeF(max(8.0, font.pointSizeF() * 0.9))
        self.text.setFont(font)
        self.text.setPlaceholderText("What LoRA Studio did, and the details behind any error, appear here.")
        clear = QPushButton("Clear")
        clear.clicked.connect(self.text.clear)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(clear)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.text, 1)
        layout.addLayout(row)
        # Plain copies, for tests and "copy log"; bounded like the view, or a day of jobs would grow it for ever.
        self.lines: deque[str] = deque(maxlen=MAX_BLOCKS)
        # elided: a long path asked the dock for its whole width, which cut the Clear button
        self.log_file = ElidedLabel("", mode=Qt.TextElideMode.ElideMiddle)
        self.log_file.setStyleSheet("color: palette(mid);")
        row.insertWidget(0, self.log_file, 1)

    def show_log_file(self, path: Path | str | None) -> None:
        """Say where the log file is (for a bug report)."""
        self.log_file.setText(f"log file: {path}" if path else "no log file (the data folder is not writable)")
        self.log_file.setToolTip(str(path or ""))

    def log(self, message: str, level: str = "info", detail: str = "") -> None:
        logger.log(_LEVELS.get(level, logging.INFO), "%s%s", message, f"\n{detail.rstrip()}" if detail.strip() else "")
        stamp = time.strftime("%H:%M:%S")
        line = f"{stamp} {level.upper():5} {message}"
        self.lines.append(line)
        self.text.appendPlainText(line)
        if detail.strip():
            indented = "\n".join("      " + d for d in detail.rstrip().splitlines())
            self.lines.append(indented)
            self.text.appendPlainText(indented)
        self.text.moveCursor(QTextCursor.MoveOperation.End)

    def contents(self) -> str:
        return "\n".join(self.lines)
