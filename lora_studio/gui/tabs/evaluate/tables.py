"""The Evaluate tab's tables: the summary page (per set, Δloss by set, the verdict) and the examples page.

Each page takes an :class:`~lora_studio.core.evaluate.run.EvaluationResult` through ``show_result`` and fills
its tables; a double-click on an example answers with :attr:`ExamplesPage.example_opened` (the example's index).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    from lora_studio.core.evaluate.run import EvaluationResult, VariantSummary

ALL_SETS = "all sets"
REGRESSION = QColor("#f8d7da")
BETTER = QColor("#d4edda")
ROW_HEIGHT = 22  # compact rows: the base and four variants fit the summary at 1280×720


class NumberItem(QTableWidgetItem):
    """A table cell that sorts by its value, not its text."""

    def __init__(self, value: float | None, text: str) -> None:
        super().__init__(text)
        self.setData(Qt.ItemDataRole.UserRole, float("-inf") if value is None else value)
        self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        return float(self.data(Qt.ItemDataRole.UserRole)) < float(other.data(Qt.ItemDataRole.UserRole))


def read_only(table: QTableWidget) -> None:
    """Rows selected whole, no editing, no row numbers, compact alternating rows."""
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(ROW_HEIGHT)
    table.setAlternatingRowColors(True)


NO_RESULT = "Pick the data and the variants, then Evaluate."


class SummaryPage(QWidget):
    """The set picker, the summary table, the Δloss of each variant on each set, and the verdict."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.result: EvaluationResult | None = None
        self.set_combo = QComboBox()
        self.set_combo.addItem(ALL_SETS)
        self.set_combo.setToolTip("the summary of one set, or of every set together")
        self.verdict = QLabel(NO_RESULT)
        self.verdict.setWordWrap(True)
        self.summary_table = QTableWidget(0, 8)
        self.summary_table.setHorizontalHeaderLabels(
            ["variant", "loss", "perplexity", "accuracy", "KL", "Δloss", "95 % CI", "regressions"]
        )
        read_only(self.summary_table)
        self.summary_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        # the names take what the numbers leave (elided in the middle): the last column stays in view at 1280 px
        self.summary_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.summary_table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.summary_table.setToolTip(
            "loss: mean cross-entropy per answer token (nats); accuracy: the variant's greedy token is the answer's; "
            "KL: from the reference; Δloss: against the reference, with the paired bootstrap's 95 % interval "
            "(green/red: the interval excludes 0); regressions: examples clearly worse than the base"
        )
        self.by_set_table = QTableWidget(0, 0)
        read_only(self.by_set_table)
        self.by_set_table.setToolTip(
            "Δloss against the reference on each set (nats per answer token); green: better, red: worse, "
            "with the 95 % interval excluding 0; plain: no clear change"
        )
        self.by_set_table.hide()

        layout = QVBoxLayout(self)
        set_row = QHBoxLayout()
        set_row.addWidget(QLabel("Set"))
        set_row.addWidget(self.set_combo, 1)
        layout.addLayout(set_row)
        layout.addWidget(self.summary_table, 1)
        layout.addWidget(self.by_set_table, 1)
        layout.addWidget(self.verdict)
        self.set_combo.currentIndexChanged.connect(lambda _i: self.show_summary())

    def clear(self) -> None:
        """No result (another base was loaded): the tables empty, the first words back."""
        self.result = None
        self.summary_table.setRowCount(0)
        self.by_set_table.hide()
        self.set_combo.blockSignals(True)
        self.set_combo.clear()
        self.set_combo.addItem(ALL_SETS)
        self.set_combo.blockSignals(False)
        self.verdict.setText(NO_RESULT)

    def show_result(self, result: EvaluationResult) -> None:
        """A new evaluation: one set entry per set (when there are several), every table filled."""
        self.result = result
        self.set_combo.blockSignals(True)
        self.set_combo.clear()
        self.set_combo.addItem(ALL_SETS)
        if len(result.sets) > 1:
            self.set_combo.addItems([s.name for s in result.sets])
        self.set_combo.blockSignals(False)
        self.show_summary()
        if fill_by_set(self.by_set_table, result):
            self.by_set_table.show()
        else:
            self.by_set_table.hide()

    def show_summary(self) -> None:
        """The summary rows and the verdict of the set picked (every set together by default)."""
        result = self.result
        if result is None:
            return
        dataset = None if self.set_combo.currentText() in ("", ALL_SETS) else self.set_combo.currentText()
        fill_summary(self.summary_table, [s for s in result.summary if s.dataset == dataset])
        self.verdict.setText(verdict_text(result, dataset))


class ExamplesPage(QWidget):
    """One row per example, sortable by each variant's change; a double-click asks to open the example."""

    example_opened = Signal(int)  # the index of the example in the result, whatever the sort

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.examples_table = QTableWidget(0, 0)
        read_only(self.examples_table)
        self.examples_table.setSortingEnabled(True)
        self.examples_table.setWordWrap(False)
        self.examples_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.examples_table.setToolTip(
            "one row per example: each variant's loss, and its change against the reference; red: a regression "
            "(clearly worse than the base). Click a header to sort; double-click to open the example in Compare"
        )
        self.examples_note = QLabel("")
        self.examples_note.setWordWrap(True)  # a long line here would widen the whole window
        self.examples_note.setStyleSheet("color: palette(mid);")
        layout = QVBoxLayout(self)
        layout.addWidget(self.examples_table, 1)
        layout.addWidget(self.examples_note)
        self.examples_table.cellDoubleClicked.connect(self._double_clicked)

    def show_result(self, result: EvaluationResult) -> None:
        fill_examples(self.examples_table, result)
        total = sum(len(v) for v in result.regressed.values())
        self.examples_note.setText(
            f"{len(result.examples)} examples; {total} regression(s) (loss above the base's by more than "
            f"{_regression_nats():g} nats/token). Double-click an example to open it in Compare."
        )

    def clear(self) -> None:
        self.examples_table.setRowCount(0)
        self.examples_note.setText("")

    def _double_clicked(self, row: int, _column: int) -> None:
        item = self.examples_table.item(row, 2)
        if item is not None and item.data(Qt.ItemDataRole.UserRole) is not None:
            self.example_opened.emit(int(item.data(Qt.ItemDataRole.UserRole)))


def fill_summary(table: QTableWidget, rows: list[VariantSummary]) -> None:
    """One row per variant: loss, perplexity, accuracy, KL, Δloss and its interval (coloured when clear)."""
    table.setRowCount(len(rows))
    for r, s in enumerate(rows):
        cells = [
            QTableWidgetItem(s.name),
            NumberItem(s.loss, f"{s.loss:.4f}"),
            NumberItem(s.perplexity, f"{s.perplexity:.2f}"),
            NumberItem(s.accuracy, f"{100 * s.accuracy:.1f} %"),
            NumberItem(s.kl, "-" if s.kl is None else f"{s.kl:.4f}"),
            NumberItem(s.delta_loss, "-" if s.delta_loss is None else f"{s.delta_loss:+.4f}"),
            QTableWidgetItem("-" if s.delta_ci is None else f"[{s.delta_ci.low:+.3f}, {s.delta_ci.high:+.3f}]"),
            NumberItem(s.regressions, str(s.regressions)),
        ]
        if s.significant and s.delta_loss is not None:
            colour = BETTER if s.delta_loss < 0 else REGRESSION
            for cell in cells[5:7]:
                cell.setBackground(colour)
        for c, cell in enumerate(cells):
            table.setItem(r, c, cell)


def fill_by_set(table: QTableWidget, result: EvaluationResult) -> bool:
    """Which variant helps on which set, and by how much: Δloss per (variant, set). False: one set, nothing to show."""
    if len(result.sets) < 2:
        return False
    others = [n for n in result.names if n != result.reference]
    sets = [s.name for s in result.sets]
    cells = {(s.name, s.dataset): s for s in result.summary}
    table.clear()
    table.setRowCount(len(others))
    table.setColumnCount(len(sets))
    table.setHorizontalHeaderLabels([f"Δloss on {name}" for name in sets])
    table.setVerticalHeaderLabels(others)
    table.verticalHeader().setVisible(True)
    for r, name in enumerate(others):
        for c, dataset in enumerate(sets):
            summary = cells[(name, dataset)]
            delta = summary.delta_loss or 0.0
            item = NumberItem(delta, f"{delta:+.3f}")
            if summary.significant:
                item.setBackground(BETTER if delta < 0 else REGRESSION)
            if summary.delta_ci is not None:
                item.setToolTip(f"95 % interval [{summary.delta_ci.low:+.3f}, {summary.delta_ci.high:+.3f}]")
            table.setItem(r, c, item)
    table.resizeColumnsToContents()
    return True


def fill_examples(table: QTableWidget, result: EvaluationResult) -> None:
    """One row per example: the reference's loss, each other variant's Δloss (red: a regression) and KL."""
    others = [n for n in result.names if n != result.reference]
    headers = ["set", "row", "prompt", f"{result.reference} loss"]
    headers += [f"{n} Δloss" for n in others] + [f"{n} KL" for n in others]
    table.setSortingEnabled(False)
    table.clear()
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    examples = result.examples
    table.setRowCount(len(examples))
    for r, e in enumerate(examples):
        ref = result.scores[result.reference][r]
        prompt = QTableWidgetItem(" ".join(e.prompt.split())[:120])
        prompt.setToolTip(f"{e.prompt}\n\n— answer —\n{e.answer}")
        prompt.setData(Qt.ItemDataRole.UserRole, r)  # the example behind the row, whatever the sort
        cells: list[QTableWidgetItem] = [
            QTableWidgetItem(e.dataset),
            NumberItem(e.source_row, str(e.source_row)),
            prompt,
            NumberItem(ref.loss, f"{ref.loss:.3f}"),
        ]
        regressed = result.regressed.get(e.index, [])
        for n in others:
            delta = result.scores[n][r].loss - ref.loss
            cell: QTableWidgetItem = NumberItem(delta, f"{delta:+.3f}")
            if n in regressed:
                cell.setBackground(REGRESSION)
                cell.setToolTip(f"a regression: {n} is clearly worse than the base here")
            cells.append(cell)
        for n in others:
            kl = result.scores[n][r].mean_kl
            cells.append(NumberItem(kl, "-" if kl is None else f"{kl:.3f}"))
        for c, cell in enumerate(cells):
            table.setItem(r, c, cell)
    table.setSortingEnabled(True)
    if others:
        table.sortItems(4, Qt.SortOrder.DescendingOrder)  # the largest increase of the first variant first
    table.resizeColumnsToContents()
    table.setColumnWidth(2, 280)  # the prompt: its whole text is the cell's tooltip


def _regression_nats() -> float:
    from lora_studio.core.evaluate.stats import REGRESSION_NATS

    return REGRESSION_NATS


def verdict_text(result: EvaluationResult, dataset: str | None) -> str:
    """One line per variant: better, worse or no clear change against the reference, and by how much."""
    lines = []
    for s in result.summary:
        if s.dataset != dataset or s.delta_loss is None:
            continue
        change = f"{s.delta_loss:+.3f} nats/token"
        if s.delta_ci is None:
            word = "changed by"
        elif not s.significant:
            word = "no clear change"
            change = f"({change}, the interval includes 0)"
        else:
            word = "better than" if s.delta_loss < 0 else "worse than"
        tail = f" {result.reference}: {change}" if word != "no clear change" else f" from {result.reference} {change}"
        lines.append(f"{s.name}: {word}{tail}")
    where = dataset or "all sets"
    return f"On {where}: " + "; ".join(lines) if lines else ""
