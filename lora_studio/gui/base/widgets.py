"""Small shared pieces: a message line stating one result, an eliding label, progress bars fed from core Progress."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from typing import Any

from PySide6.QtCore import QCoreApplication, QEvent, QObject, QSize, Qt, QTimer
from PySide6.QtGui import QColor, QPaintEvent, QResizeEvent
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QComboBox,
    QLabel,
    QMessageBox,
    QProgressBar,
    QSizePolicy,
    QSplitter,
    QStyle,
    QStyleOptionProgressBar,
    QStylePainter,
    QWidget,
)

from lora_studio.core.system.memory import format_bytes
from lora_studio.core.tasks import Progress

STYLES = {
    "ok": "color: #2a7a2a;",
    "warn": "color: #b35900;",
    "error": "color: #c0392b; font-weight: bold;",
    "info": "",
}


PATH_SEPARATOR = re.compile(r"(?<!<)/(?!>)|\\")  # a / or \ of a path, not of a tag like </b> or <br/>


class MessageLine(QLabel):
    """One line saying what just happened; errors in red, never a dialog."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.kind = "info"
        self._full = ""
        self._on_link: Callable[[], object] | None = None
        self.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse | Qt.TextInteractionFlag.LinksAccessibleByMouse
        )
        self.linkActivated.connect(self._link_activated)

    def show_message(self, text: str, kind: str = "info") -> None:
        self.kind = kind
        self.setStyleSheet(STYLES.get(kind, ""))
        self.setText(text)
        self.setToolTip(text)

    def setText(self, text: str) -> None:
        self._full = text
        self._on_link = None
        self.setTextFormat(Qt.TextFormat.PlainText)  # a name with "<" in it is shown, not parsed
        # a long path has no space to wrap at: it would widen the panel past the window; a break is allowed after
        # each separator (a zero-width space, invisible)
        super().setText(PATH_SEPARATOR.sub("\\g<0>\u200b", text))

    def show_with_link(self, text: str, link: str, on_link: Callable[[], object], kind: str = "ok") -> None:
        """``text — link``: the link (an "open it") calls ``on_link``; ``text()`` is ``text``."""
        self.show_message(text, kind)
        self._on_link = on_link
        self.setTextFormat(Qt.TextFormat.RichText)
        breakable = PATH_SEPARATOR.sub("\\g<0>\u200b", html.escape(text))
        QLabel.setText(self, f'{breakable} — <a href="#">{html.escape(link)}</a>')

    def _link_activated(self, _href: str) -> None:
        if self._on_link is not None:
            self._on_link()

    def text(self) -> str:
        """The message as given (the label's own text has the break points)."""
        return self._full


class ElidedLabel(QLabel):
    """One line that fits the width it is given: elided (…) when too long, the full text in its tooltip.

    A plain QLabel asks for its whole text's width, so a long status makes the status bar (and so the window)
    wider, or its text is cut off at the edge. ``text()`` is the full text.
    """

    def __init__(
        self,
        text: str = "",
        parent: QWidget | None = None,
        mode: Qt.TextElideMode = Qt.TextElideMode.ElideRight,
    ) -> None:
        super().__init__(parent)
        self._full = ""
        self._mode = mode
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setText(text)

    def text(self) -> str:
        return self._full

    def setText(self, text: str) -> None:
        self._full = text
        self._fit()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._fit()

    def minimumSizeHint(self) -> QSize:
        return QSize(0, super().minimumSizeHint().height())

    def _fit(self) -> None:
        shown = self.fontMetrics().elidedText(self._full, self._mode, max(0, self.width() - 2))
        super().setText(shown)
        self.setToolTip(self._full)


class ElidingProgressBar(QProgressBar):
    """A progress bar whose text fits: the count after the last ": " stays whole and the stage before it is elided at
    its end ("verifying: running the adap…: 1/3 prompts"), so the stage still reads from its start. The full text is
    in the tooltip (show_progress sets it).

    While busy (range 0..0: the work is not countable yet) it draws its own block sliding along an empty groove, a few
    frames a second. The style's busy animation repaints the bar at 60 frames a second, and on a 2-core machine those
    paints took a third of the GUI thread's time while a job ran, so every other event waited longer.
    """

    BUSY_FRAME_MS = 120
    BUSY_FRAMES = 24  # frames for one sweep across

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._busy_frame = 0
        self._busy_timer = QTimer(self)
        self._busy_timer.setInterval(self.BUSY_FRAME_MS)
        self._busy_timer.timeout.connect(self._next_busy_frame)

    def is_busy(self) -> bool:
        return self.minimum() == self.maximum()

    def _next_busy_frame(self) -> None:
        if not self.is_busy() or not self.isVisible():
            self._busy_timer.stop()
            return
        self._busy_frame = (self._busy_frame + 1) % (2 * self.BUSY_FRAMES)
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        if not self.is_busy():
            self._busy_timer.stop()
            super().paintEvent(event)
            return
        if not self._busy_timer.isActive():
            self._busy_timer.start()
        option = QStyleOptionProgressBar()
        self.initStyleOption(option)
        option.minimum, option.maximum, option.progress = 0, 1, 0  # an empty groove: no style animation
        painter = QStylePainter(self)
        painter.drawControl(QStyle.ControlElement.CE_ProgressBarGroove, option)
        inner = self.style().subElementRect(QStyle.SubElement.SE_ProgressBarContents, option, self)
        width = max(8, inner.width() // 5)
        step = self._busy_frame if self._busy_frame < self.BUSY_FRAMES else 2 * self.BUSY_FRAMES - self._busy_frame
        left = inner.left() + (inner.width() - width) * step // self.BUSY_FRAMES
        block = QColor(self.palette().highlight().color())
        block.setAlpha(110)
        painter.fillRect(left, inner.top(), width, inner.height(), block)
        painter.drawControl(QStyle.ControlElement.CE_ProgressBarLabel, option)

    def text(self) -> str:  # Qt's virtual: the style asks it for the text to draw
        full = self.format() if self.is_busy() else super().text()  # Qt's own says nothing while busy
        metrics = self.fontMetrics()
        room = max(0, self.width() - 16)
        if metrics.horizontalAdvance(full) <= room:
            return full
        stage, sep, count = full.rpartition(": ")
        if not sep:
            return metrics.elidedText(full, Qt.TextElideMode.ElideMiddle, room)
        tail = sep + count
        head_room = room - metrics.horizontalAdvance(tail)
        if head_room <= metrics.horizontalAdvance("…") * 4:  # too narrow for any of the stage: keep the middle rule
            return metrics.elidedText(full, Qt.TextElideMode.ElideMiddle, room)
        return metrics.elidedText(stage, Qt.TextElideMode.ElideRight, head_room) + tail


def job_progress_bar() -> QProgressBar:
    """A progress bar that is hidden between jobs but keeps its place in the layout.

    Showing a bar that took no space re-lays out its panel when a job starts and ends: every chart
    beside it is resized and repainted (pyqtgraph calls back into Python for each), which beside a
    busy worker stalled the window by 50-70 ms.
    """
    bar = ElidingProgressBar()
    policy = bar.sizePolicy()
    policy.setRetainSizeWhenHidden(True)
    bar.setSizePolicy(policy)
    reset_progress(bar)
    bar.hide()
    return bar


def progress_text(progress: Progress) -> str:
    """What a bar says: the stage and its count ("verifying: running the adapter model: 2/3 prompts"), bytes in MiB."""
    if progress.fraction is None:
        return progress.message
    if progress.unit == "bytes":
        done, total = format_bytes(int(progress.done)), format_bytes(int(progress.total or 0))
        return f"{progress.message} · {done} of {total}"
    if progress.counted:  # "scoring examples 26/36" says its count already; a second one could disagree
        return progress.message
    unit = f" {progress.unit}" if progress.unit else ""
    return f"{progress.message}: {int(progress.done):,}/{int(progress.total or 0):,}{unit}"


def show_progress(bar: QProgressBar, progress: Progress) -> None:
    """Determinate when the work is countable, a busy bar when not; the text also in the tooltip (a bar elides)."""
    fraction = progress.fraction
    if fraction is None:
        bar.setRange(0, 0)
    else:
        bar.setRange(0, 1000)
        bar.setValue(int(fraction * 1000))
    bar.setFormat(progress_text(progress))
    bar.setTextVisible(True)
    bar.setToolTip(bar.format())


def reset_progress(bar: QProgressBar) -> None:
    bar.setRange(0, 1000)
    bar.setValue(0)
    bar.setFormat("")
    bar.setToolTip("")


def names_shown(names: Sequence[str], most: int = 5) -> str:
    """``a, b, c`` for a question, at most ``most`` of them: ``a, b, c, d, e and 3 more``."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def ask_yes_no(parent: QWidget, title: str, text: str, *, default_yes: bool = False) -> bool:
    """A Yes/No question; True for Yes. ``default_yes`` picks the button Enter presses (No unless it is safe)."""
    yes, no = QMessageBox.StandardButton.Yes, QMessageBox.StandardButton.No
    return QMessageBox.question(parent, title, text, yes | no, yes if default_yes else no) == yes


SWATCH_GLYPHS = {"solid": "━━", "dash": "╍╍", "dot": "┉┉"}


def swatch(color: str, style: str = "solid") -> str:
    """A short coloured line in rich text ("solid", "dash" or "dot"): the legend entry of a curve in a label."""
    return f"<span style='color:{color}; font-weight:bold'>{SWATCH_GLYPHS[style]}</span>"


def line_chart(bottom: str, left: str, *, min_height: int = 120) -> Any:
    """A white pyqtgraph plot with a grid, the axis labels and a small legend above the plot area (the tabs' result
    charts).

    No preferred height (pyqtgraph asks for 480 px): the chart takes what its layout leaves, so the buttons
    under it stay in view at 1280×720."""
    import pyqtgraph as pg

    plot = pg.PlotWidget()
    plot.setBackground("w")
    plot.showGrid(x=True, y=True, alpha=0.25)
    plot.setLabel("bottom", bottom)
    plot.setLabel("left", left)
    plot.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)
    plot.setMinimumHeight(min_height)
    _legend_above(plot)
    return plot


def _legend_above(plot: Any, columns: int = 4) -> Any:
    """Give ``plot`` a legend in a row of its own above the plot area, where pyqtgraph's title would be: inside
    the plot area a legend covers the lines it names. Curves plotted with a ``name`` are listed in it, as with
    ``addLegend``; ``columns`` entries a row. The legend."""
    import pyqtgraph as pg

    item = plot.getPlotItem()
    legend = pg.LegendItem(colCount=columns, labelTextSize="8pt", labelTextColor="#333", horSpacing=12, verSpacing=-6)
    item.layout.removeItem(item.titleLabel)  # these charts have no title: its row takes the legend
    item.titleLabel.hide()
    item.layout.addItem(legend, 0, 1)
    item.legend = legend  # where PlotItem.plot(name=...) adds each curve
    return legend


def append_text(edit: Any, text: str) -> None:
    """Append ``text`` at the end of a text view (QPlainTextEdit, QTextEdit); the view follows the new text only
    when it was scrolled to the end, so a reader scrolled up is not pulled down while tokens stream in."""
    from PySide6.QtGui import QTextCursor

    bar = edit.verticalScrollBar()
    at_end = bar.value() >= bar.maximum() - 2
    cursor = QTextCursor(edit.document())
    cursor.movePosition(QTextCursor.MoveOperation.End)
    cursor.insertText(text)
    if at_end:
        bar.setValue(bar.maximum())


def side_by_side(left: QWidget, right: QWidget, widths: tuple[int, int]) -> QSplitter:
    """A tab's two panes (its inputs | what they give): the right one takes the extra width."""
    splitter = QSplitter(Qt.Orientation.Horizontal)
    splitter.addWidget(left)
    splitter.addWidget(right)
    splitter.setStretchFactor(1, 1)
    splitter.setSizes(list(widths))
    return splitter


class FocusedWheelOnly(QObject):
    """An event filter: a wheel event reaches a field only while it has the focus; otherwise it goes to the
    scroll area around it."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Wheel and isinstance(watched, QWidget) and not watched.hasFocus():
            parent = watched.parentWidget()
            if parent is not None:  # Qt hands an unhandled wheel on up, to the scroll area
                QCoreApplication.sendEvent(parent, event)
            return True
        return super().eventFilter(watched, event)


def wheel_scrolls_past_fields(root: QWidget) -> FocusedWheelOnly:
    """The wheel over ``root`` scrolls its pane: a spin box or list box under it changes by the wheel only once
    clicked (a scroll down a form changed the rank, the steps or a GPU size on the way). Keep the returned filter."""
    guard = FocusedWheelOnly(root)
    for field in root.findChildren(QAbstractSpinBox) + root.findChildren(QComboBox):
        field.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        field.installEventFilter(guard)
    return guard


def refill_adapter_choices(combo: QComboBox, names: list[str], *, choose_new: bool = True) -> None:
    """Fill ``combo`` with ``names`` without a signal. An adapter new since the last fill is chosen, unless
    ``choose_new`` is False (the one just trained or attached is the one to judge next); otherwise the choice stays
    while it is attached."""
    before = [combo.itemText(i) for i in range(combo.count())]
    current = combo.currentText()
    new = [name for name in names if name not in before] if choose_new else []
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    chosen = new[-1] if new and before else current
    if chosen in names:
        combo.setCurrentText(chosen)
    combo.blockSignals(False)
