"""The log: every job's start and end, and the full story behind each one-line error."""

from __future__ import annotations

import time

from PySide6.QtGui import QFont, QTextCursor
from PySide6.QtWidgets import QHBoxLayout, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

MAX_BLOCKS = 5000  # old lines scroll away instead of growing without bound


class LogPanel(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.text = QPlainTextEdit(readOnly=True)
        self.text.setMaximumBlockCount(MAX_BLOCKS)
        font = QFont("monospace")
        font.setStyleHint(QFont.Monospace)
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
        self.lines: list[str] = []  # plain copies, for tests and "copy log"

    def log(self, message: str, level: str = "info", detail: str = "") -> None:
        stamp = time.strftime("%H:%M:%S")
        line = f"{stamp} {level.upper():5} {message}"
        self.lines.append(line)
        self.text.appendPlainText(line)
        if detail.strip():
            indented = "\n".join("      " + d for d in detail.rstrip().splitlines())
            self.lines.append(indented)
            self.text.appendPlainText(indented)
        self.text.moveCursor(QTextCursor.End)

    def contents(self) -> str:
        return "\n".join(self.lines)
