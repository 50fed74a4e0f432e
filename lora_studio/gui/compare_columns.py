"""The Compare tab's columns: one per variant, its streamed text, its divergence mark and its KL strip.

After a run every column is marked where it first differs from the reference column, and a
:class:`KLStrip` under it paints the teacher-forced per-token KL against the reference continuation.
"""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import QEvent, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPen, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QFrame, QLabel, QPlainTextEdit, QSizePolicy, QToolTip, QVBoxLayout, QWidget

from lora_studio.gui.compare_stream import display_text

KIND_BASE, KIND_ADAPTER, KIND_MERGED = "base", "adapter", "merged"
DIVERGED_BACKGROUND = "#fde2c4"  # from the first differing token onward
COLUMN_MIN_WIDTH = 180


# -- the KL heat strip ------------------------------------------------------------------------------------------------


def kl_color(kl: float) -> QColor:
    """Pale for agreement, deep red for large KL; 1 - exp(-kl) keeps small differences visible."""
    t = 1.0 - math.exp(-max(0.0, kl))
    low, high = (238, 242, 246), (200, 30, 30)
    return QColor(*(int(a + (b - a) * t) for a, b in zip(low, high, strict=True)))


class KLStrip(QWidget):
    """One cell per reference token, coloured by KL(reference ‖ this column); tooltip per token."""

    HEIGHT = 16

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setFixedHeight(self.HEIGHT)
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.kl: list[float] = []
        self.logprobs: list[float] = []
        self.agrees: list[bool] = []
        self.pieces: list[str] = []
        self.first_divergence: int | None = None
        self.setToolTip("teacher-forced KL against the reference, per token (after a run)")

    def set_scores(self, scores: Any, pieces: list[str], first_divergence: int | None) -> None:
        """``scores``: core.compare.divergence.TokenScores, or None to clear."""
        self.kl = list(scores.kl) if scores else []
        self.logprobs = list(scores.logprobs) if scores else []
        self.agrees = list(scores.agrees) if scores else []
        self.pieces = list(pieces)
        self.first_divergence = first_divergence
        self.setToolTip("" if self.kl else "no tokens to score")
        self.update()

    def clear(self) -> None:
        self.set_scores(None, [], None)
        self.setToolTip("teacher-forced KL against the reference, per token (after a run)")

    def index_at(self, x: float) -> int | None:
        if not self.kl or self.width() <= 0:
            return None
        return min(len(self.kl) - 1, max(0, int(x * len(self.kl) / self.width())))

    def tooltip_for(self, i: int) -> str:
        piece = self.pieces[i] if i < len(self.pieces) else ""
        agree = "its greedy choice agrees" if self.agrees[i] else "its greedy choice differs"
        return f"token {i} {piece!r}\nlog p = {self.logprobs[i]:.3f}\nKL = {self.kl[i]:.4f} nats\n{agree}"

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ToolTip and self.kl:
            i = self.index_at(event.position().x() if hasattr(event, "position") else event.pos().x())
            if i is not None:
                QToolTip.showText(event.globalPos(), self.tooltip_for(i), self)
                return True
        return super().event(event)

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        rect = self.rect()
        painter.fillRect(rect, QColor("#f7f7f7"))
        n = len(self.kl)
        if n:
            width = rect.width() / n
            for i, kl in enumerate(self.kl):
                painter.fillRect(QRectF(i * width, 0, width + 0.5, rect.height()), kl_color(kl))
            if self.first_divergence is not None and self.first_divergence < n:
                painter.setPen(QPen(QColor("#222222"), 2))
                x = int(self.first_divergence * width)
                painter.drawLine(x, 0, x, rect.height())
        painter.setPen(QColor("#c8c8c8"))
        painter.drawRect(rect.adjusted(0, 0, -1, -1))
        painter.end()


# -- one column -------------------------------------------------------------------------------------------------------


class ColumnView(QFrame):
    """Header (name, summary numbers), the streamed text, the KL strip."""

    def __init__(self, name: str, kind: str, parent=None) -> None:
        super().__init__(parent)
        self.name, self.kind = name, kind
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setMinimumWidth(COLUMN_MIN_WIDTH)
        self.header = QLabel()
        self.header.setTextFormat(Qt.TextFormat.RichText)
        self.header.setWordWrap(True)
        self.header.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.text = QPlainTextEdit(readOnly=True)
        self.text.setPlaceholderText("press Run")
        font = QFont(self.text.font())
        font.setPointSizeF(max(10.0, font.pointSizeF()))
        self.text.setFont(font)
        self.strip = KLStrip()
        self.strip_label = QLabel("KL vs reference, per token")
        self.strip_label.setStyleSheet("color: palette(mid); font-size: 8pt;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(4)
        layout.addWidget(self.header)
        layout.addWidget(self.text, 1)
        layout.addWidget(self.strip)
        layout.addWidget(self.strip_label)
        self.tokens = 0
        self.streamed = ""  # exactly what arrived from the stream (the final text replaces it only if they differ)
        self.first_divergence: int | None = None
        self.scores = None
        self.set_header()

    def set_header(self, detail: str = "") -> None:
        kinds = {KIND_BASE: "adapters off", KIND_ADAPTER: "adapter", KIND_MERGED: "merged folder"}
        line = f"<b>{_html(self.name)}</b> <span style='color:gray'>({kinds.get(self.kind, self.kind)})</span>"
        self.header.setText(line + (f"<br>{detail}" if detail else ""))

    def reset(self) -> None:
        self.text.clear()
        self.tokens, self.streamed = 0, ""
        self.first_divergence, self.scores = None, None
        self.strip.clear()
        self.set_header()

    def append(self, text: str, tokens: int) -> None:
        self.tokens += tokens
        self.streamed += text
        if text:
            bar = self.text.verticalScrollBar()
            at_end = bar.value() >= bar.maximum() - 2
            cursor = QTextCursor(self.text.document())
            cursor.movePosition(QTextCursor.MoveOperation.End)
            cursor.insertText(display_text(text))
            if at_end:
                bar.setValue(bar.maximum())
        self.set_header(f"<span style='color:gray'>{self.tokens} tokens…</span>")

    def finish(self, output: Any, column: Any, reference: str, pieces: list[str], offset: int | None) -> None:
        """Final text, the divergence mark, the strip and the summary in the header.

        ``output``: the column's core VariantOutput; ``column``: its ColumnDivergence against ``reference``.
        """
        shown = display_text(output.text)
        if self.text.toPlainText() != shown:
            self.text.setPlainText(shown)
        self.tokens = len(output.token_ids)
        self.first_divergence = column.first_divergence
        self.scores = column.scores
        if offset is not None and offset < len(shown):
            fmt = QTextCharFormat()
            fmt.setBackground(QColor(DIVERGED_BACKGROUND))
            cursor = QTextCursor(self.text.document())
            cursor.setPosition(offset)
            cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
            cursor.mergeCharFormat(fmt)
        self.strip.set_scores(column.scores, pieces, column.first_divergence)
        parts = [f"{self.tokens} tokens"]
        if self.name == reference:
            parts.append("<i>reference</i>")
        elif column.first_divergence is None:
            parts.append("identical to the reference")
        else:
            parts.append(f"differs from token {column.first_divergence}")
        if column.scores is not None and self.name != reference:
            parts.append(f"mean KL {column.scores.mean_kl:.3f}")
            parts.append(f"agreement {column.scores.agreement:.0f} %")
        self.set_header(" · ".join(parts))
        self.setToolTip(
            ""
            if self.name == reference
            else "highlighted: from the first token that differs from the reference;\n"
            "strip: how surprised this variant is by the reference's tokens (KL, nats)"
        )


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
