"""The Compare tab's columns: one per variant, its streamed text, its divergence mark and its KL strip.

After a run every column is marked where it first differs from the reference column, and a
:class:`KLStrip` under it paints the teacher-forced per-token KL against the reference continuation
(:class:`KLLegend` says what its colours mean). Hovering a strip cell highlights that reference token
in every column whose text holds it (the reference, and the others up to their first divergence).
"""

from __future__ import annotations

import math
from typing import Any, cast

from PySide6.QtCore import QEvent, QRectF, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QFont,
    QHelpEvent,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QTextCharFormat,
    QTextCursor,
)
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QSizePolicy,
    QTextEdit,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from lora_studio.gui.base.widgets import append_text
from lora_studio.gui.tabs.compare.stream import display_text

KIND_BASE, KIND_ADAPTER, KIND_MERGED = "base", "adapter", "merged"
DIVERGED_BACKGROUND = "#fde2c4"  # from the first differing token onward
HOVERED_BACKGROUND = "#9fd0ff"  # the token under the mouse in a KL strip (blue: apart from the orange mark)
COLUMN_MIN_WIDTH = 150  # four columns fit beside the variant list in a 1280 px window
LEGEND_TICKS = (0.0, 0.25, 1.0, 3.0)  # nats, labelled on the colour legend


# -- the KL heat strip ------------------------------------------------------------------------------------------------


def kl_color(kl: float) -> QColor:
    """Pale for agreement, deep red for large KL; 1 - exp(-kl) keeps small differences visible."""
    t = 1.0 - math.exp(-max(0.0, kl))
    low, high = (238, 242, 246), (200, 30, 30)
    return QColor(*(int(a + (b - a) * t) for a, b in zip(low, high, strict=True)))


def kl_position(kl: float) -> float:
    """Where ``kl`` sits on the legend, 0..1: the same 1 - exp(-kl) that mixes its colour."""
    return 1.0 - math.exp(-max(0.0, kl))


class KLLegend(QWidget):
    """The strip's colour scale, low to high KL (nats), with a few labelled ticks."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFixedSize(160, 16)
        self.setToolTip(
            "KL(reference ‖ column) per reference token, in nats: how surprised a column is by the reference's "
            "next token.\npale = the same distribution, deep red = far apart (3 nats and more)"
        )

    def paintEvent(self, _event: QPaintEvent) -> None:
        painter = QPainter(self)
        rect = self.rect()
        steps = max(1, rect.width())
        for x in range(steps):  # position -> kl inverts kl_position, so the bar is the strip's own colours
            t = min(0.999, x / steps)
            painter.fillRect(QRectF(x, 0, 1.5, rect.height()), kl_color(-math.log(1.0 - t)))
        font = QFont(painter.font())
        font.setPointSizeF(7.5)
        painter.setFont(font)
        for kl in LEGEND_TICKS:
            x = int(kl_position(kl) * (rect.width() - 1))
            painter.setPen(QColor("#ffffff" if kl >= 1.0 else "#333333"))
            painter.drawLine(x, rect.height() - 4, x, rect.height())
            label = f"{kl:g}" + ("+" if kl == LEGEND_TICKS[-1] else "")
            width = painter.fontMetrics().horizontalAdvance(label)
            left = min(max(x + 2, 0), rect.width() - width - 2) if kl else 2
            painter.drawText(QRectF(left, 0, width + 2, rect.height() - 2), Qt.AlignmentFlag.AlignVCenter, label)
        painter.setPen(QColor("#c8c8c8"))
        painter.drawRect(rect.adjusted(0, 0, -1, -1))
        painter.end()


def strip_legend() -> QWidget:
    """'KL per token: low [scale] high' and the divergence mark's swatch, for the row above the columns."""
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    row.setSpacing(4)
    mark = QLabel(f"<span style='background:{DIVERGED_BACKGROUND}'>&nbsp;differs&nbsp;</span>")
    mark.setToolTip("highlighted from the first token that differs from the reference column")
    row.addWidget(mark)
    row.addSpacing(8)
    low, high = QLabel("KL per token: low"), QLabel("high")
    legend = KLLegend()
    for label in (low, high):
        label.setToolTip(legend.toolTip())
    row.addWidget(low)
    row.addWidget(legend)
    row.addWidget(high)
    box.setStyleSheet("QLabel { color: palette(dark); font-size: 8pt; }")
    return box


class KLStrip(QWidget):
    """One cell per reference token, coloured by KL(reference ‖ this column); tooltip per token.

    ``hovered`` carries the index of the cell under the mouse, or None when it leaves.
    """

    HEIGHT = 16
    hovered = Signal(object)  # int | None

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFixedHeight(self.HEIGHT)
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.kl: list[float] = []
        self.logprobs: list[float] = []
        self.agrees: list[bool] = []
        self.pieces: list[str] = []
        self.first_divergence: int | None = None
        self.hover: int | None = None
        self.setToolTip("teacher-forced KL against the reference, per token (after a run)")

    def set_scores(self, scores: Any, pieces: list[str], first_divergence: int | None) -> None:
        """``scores``: core.compare.divergence.TokenScores, or None to clear."""
        self.kl = list(scores.kl) if scores else []
        self.logprobs = list(scores.logprobs) if scores else []
        self.agrees = list(scores.agrees) if scores else []
        self.pieces = list(pieces)
        self.first_divergence = first_divergence
        self.hover = None
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

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip and self.kl:
            tip = cast(QHelpEvent, event)  # a ToolTip event is a QHelpEvent
            i = self.index_at(tip.pos().x())
            if i is not None:
                QToolTip.showText(tip.globalPos(), self.tooltip_for(i), self)
                return True
        return super().event(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        self.set_hover(self.index_at(event.position().x()))
        super().mouseMoveEvent(event)

    def leaveEvent(self, event: QEvent) -> None:
        self.set_hover(None)
        super().leaveEvent(event)

    def set_hover(self, index: int | None) -> None:
        if index != self.hover:
            self.hover = index
            self.update()
            self.hovered.emit(index)

    def paintEvent(self, _event: QPaintEvent) -> None:
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
            if self.hover is not None and self.hover < n:
                painter.setPen(QPen(QColor("#1565c0"), 2))
                painter.drawRect(QRectF(self.hover * width + 1, 1, max(2.0, width - 2), rect.height() - 2))
        painter.setPen(QColor("#c8c8c8"))
        painter.drawRect(rect.adjusted(0, 0, -1, -1))
        painter.end()


# -- one column -------------------------------------------------------------------------------------------------------


class ColumnView(QFrame):
    """Header (name, summary numbers), the streamed text, the KL strip."""

    def __init__(self, name: str, kind: str, parent: QWidget | None = None) -> None:
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
        self.token_spans: list[tuple[int, int]] = []  # each reference token's characters in the shown text
        self.set_header()

    def set_header(self, detail: str = "") -> None:
        kinds = {KIND_BASE: "adapters off", KIND_ADAPTER: "adapter", KIND_MERGED: "merged folder"}
        line = f"<b>{_html(self.name)}</b> <span style='color:gray'>({kinds.get(self.kind, self.kind)})</span>"
        self.header.setText(line + (f"<br>{detail}" if detail else ""))

    def reset(self) -> None:
        self.text.clear()
        self.tokens, self.streamed = 0, ""
        self.first_divergence, self.scores = None, None
        self.token_spans = []
        self.text.setExtraSelections([])
        self.strip.clear()
        self.set_header()

    def append(self, text: str, tokens: int) -> None:
        self.tokens += tokens
        self.streamed += text
        if text:
            append_text(self.text, display_text(text))
        self.set_header(f"<span style='color:gray'>{self.tokens} tokens…</span>")

    def finish(
        self,
        output: Any,
        column: Any,
        reference: str,
        pieces: list[str],
        offset: int | None,
        token_spans: list[tuple[int, int]] | None = None,
        *,
        limit: int | None = None,
    ) -> None:
        """Final text, the divergence mark, the strip and the summary in the header.

        ``output``: the column's core VariantOutput; ``column``: its ColumnDivergence against ``reference``;
        ``token_spans``: where each reference token sits in the reference's shown text (for the hover); ``limit``:
        the run's max new tokens (an answer that used them all was cut there, maybe mid-word: the header says so).
        """
        shown = display_text(output.text)
        if self.text.toPlainText() != shown:
            self.text.setPlainText(shown)
        self.tokens = len(output.token_ids)
        self.first_divergence = column.first_divergence
        self.scores = column.scores
        self.token_spans = list(token_spans or [])
        if offset is not None and offset < len(shown):
            fmt = QTextCharFormat()
            fmt.setBackground(QColor(DIVERGED_BACKGROUND))
            cursor = QTextCursor(self.text.document())
            cursor.setPosition(offset)
            cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
            cursor.mergeCharFormat(fmt)
        self.strip.set_scores(column.scores, pieces, column.first_divergence)
        cut = limit is not None and self.tokens >= limit
        parts = [f"{self.tokens} tokens" + (" (cut: the max new tokens)" if cut else "")]
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

    def holds_reference_token(self, index: int) -> bool:
        """True when this column's text has the reference's token ``index`` (it has not diverged before it)."""
        if not 0 <= index < len(self.token_spans):
            return False
        return self.first_divergence is None or index < self.first_divergence

    def highlight_token(self, index: int | None) -> None:
        """Highlight the reference's token ``index`` in the text (None, or a token this column lacks: clear)."""
        if index is None or not self.holds_reference_token(index):
            self.text.setExtraSelections([])
            return
        start, end = self.token_spans[index]
        length = len(self.text.toPlainText())
        start, end = min(start, length), min(max(end, start + 1), length)  # an empty piece still shows a cell
        selection = QTextEdit.ExtraSelection()
        cursor = QTextCursor(self.text.document())
        cursor.setPosition(start)
        cursor.setPosition(end, QTextCursor.MoveMode.KeepAnchor)
        selection.cursor = cursor
        fmt = QTextCharFormat()
        fmt.setBackground(QColor(HOVERED_BACKGROUND))
        selection.format = fmt
        self.text.setExtraSelections([selection])
        rect = self.text.cursorRect(cursor)
        if not self.text.viewport().rect().contains(rect.center()):  # scrolled away: bring the token into view
            shown = QTextCursor(self.text.document())
            shown.setPosition(start)
            self.text.setTextCursor(shown)
            self.text.ensureCursorVisible()

    def highlighted_span(self) -> tuple[int, int] | None:
        """The characters highlighted by a strip hover, or None."""
        selections = self.text.extraSelections()
        if not selections:
            return None
        cursor = selections[0].cursor
        return cursor.selectionStart(), cursor.selectionEnd()


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
