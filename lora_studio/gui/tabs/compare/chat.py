"""The Compare tab's chat: one transcript per ticked variant, the same user turns, each variant's own replies.

Widgets only: the chat mode (chat_mode.py) holds the core :class:`~lora_studio.core.compare.chat.Conversation`,
runs each turn as a job (core ``chat_turn``: the session's variants in one mixed batch) and streams the
replies in here through :meth:`ChatColumn.append`. A stopped turn keeps what each variant had said so far.
"""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from lora_studio.gui.base.widgets import append_text
from lora_studio.gui.tabs.compare.columns import COLUMN_MIN_WIDTH, KIND_ADAPTER, KIND_BASE, KIND_MERGED

USER_STYLE = "background:#eef3fb; border-radius:4px; padding:4px;"


class ChatColumn(QFrame):
    """One variant's transcript."""

    def __init__(self, name: str, kind: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.name, self.kind = name, kind
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setMinimumWidth(COLUMN_MIN_WIDTH)
        kinds = {KIND_BASE: "adapters off", KIND_ADAPTER: "adapter", KIND_MERGED: "merged folder"}
        self.header = QLabel(
            f"<b>{html.escape(name)}</b> <span style='color:gray'>({kinds.get(kind, kind)})</span>", self
        )
        self.transcript = QTextBrowser(self)
        self.transcript.setOpenLinks(False)
        self.streamed = ""  # the reply of the turn in progress
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.header)
        layout.addWidget(self.transcript, 1)

    def show_turns(self, turns: list[tuple[str, str, bool]]) -> None:
        """The whole transcript: (user, this variant's reply, stopped) per turn."""
        parts = []
        for user, reply, stopped in turns:
            parts.append(_user_html(user))
            parts.append(_reply_html(reply, stopped))
        self.transcript.setHtml("".join(parts))
        self.transcript.moveCursor(QTextCursor.MoveOperation.End)

    def begin_reply(self, turns: list[tuple[str, str, bool]], user: str) -> None:
        self.show_turns(turns)
        self.transcript.append(_user_html(user))
        self.transcript.append("")
        self.streamed = ""

    def append(self, text: str) -> None:
        if not text:
            return
        self.streamed += text
        append_text(self.transcript, text)


class ChatView(QWidget):
    send_requested = Signal(str)  # the user's message
    stop_requested = Signal()
    new_chat_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.columns: list[ChatColumn] = []
        self.system_edit = QLineEdit()
        self.system_edit.setPlaceholderText("system prompt (optional; applies from the next new chat)")
        self.system_edit.setClearButtonEnabled(True)
        self.new_btn = QPushButton("New chat")
        self.new_btn.setToolTip("forget the conversation: every variant starts afresh")
        top = QHBoxLayout()
        top.addWidget(self.system_edit, 1)
        top.addWidget(self.new_btn)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setChildrenCollapsible(False)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(self.splitter)
        self.empty_label = QLabel("Tick variants on the left; each answers in a column here.")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setStyleSheet("color: palette(mid);")
        self.columns_scroll = scroll

        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("your message to every variant… Ctrl+Enter sends")
        self.input.setMaximumHeight(64)
        self.input.setTabChangesFocus(True)
        self.send_btn = QPushButton("Send")
        self.send_btn.setDefault(True)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        self.note = QLabel("")
        self.note.setStyleSheet("color: palette(mid);")
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_btn)
        buttons.addWidget(self.stop_btn)
        bottom = QHBoxLayout()
        bottom.addWidget(self.input, 1)
        bottom.addLayout(buttons)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.empty_label)
        layout.addWidget(scroll, 1)
        layout.addWidget(self.note)
        layout.addLayout(bottom)

        self.send_btn.clicked.connect(self._send)
        self.stop_btn.clicked.connect(self.stop_requested.emit)
        self.new_btn.clicked.connect(self.new_chat_requested.emit)
        self.build([])

    def _send(self) -> None:
        self.send_requested.emit(self.input.toPlainText())

    def build(self, variants: list[tuple[str, str]]) -> None:
        for column in self.columns:
            column.hide()
            column.setParent(None)
        self.columns = [ChatColumn(name, kind) for name, kind in variants]
        for column in self.columns:
            self.splitter.addWidget(column)
        if self.columns:
            self.splitter.setSizes([1000] * len(self.columns))
        self.empty_label.setVisible(not self.columns)
        self.columns_scroll.setVisible(bool(self.columns))

    def column(self, name: str) -> ChatColumn:
        return next(c for c in self.columns if c.name == name)

    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _user_html(text: str) -> str:
    body = html.escape(text).replace("\n", "<br>")
    return f"<div style='{USER_STYLE}'><b>You</b><br>{body}</div>"


def _reply_html(text: str, stopped: bool) -> str:
    body = html.escape(text).replace("\n", "<br>") or "<i>(nothing)</i>"
    tail = " <span style='color:#b35900'>(stopped)</span>" if stopped else ""
    return f"<p>{body}{tail}</p>"
