"""The Reduce tab's Cut box: the adapter, its suggested cuts, the cut itself, where to save, what to measure on.

:class:`CutBox` takes the adapter names (:meth:`CutBox.set_adapters`) and a plan's suggestions
(:meth:`CutBox.show_suggestions`); a click on a suggestion sets the cut. It answers with
:attr:`CutBox.cut_changed` when the mode, the rank or the energy share changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from lora_studio.gui.base.widgets import refill_adapter_choices

if TYPE_CHECKING:
    from lora_studio.core.reduce.spectrum import Suggestion

BY_RANK, BY_ENERGY = "rank", "energy"
ROW_HEIGHT = 22
DEFAULT_ENERGY = 0.95  # the suggestion whose rank the rank box starts at


class CutBox(QGroupBox):
    """The adapter combo, the suggestions table, the mode with its rank or energy, the output, the data."""

    cut_changed = Signal()  # the mode, the rank or the energy share

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Cut", parent)
        self._suggestions: list[Suggestion] = []
        self.adapter_combo = QComboBox()
        self.adapter_combo.setToolTip("an attached LoRA adapter")
        self.suggestions = _suggestions_table()
        self.mode_combo = QComboBox()
        self.mode_combo.addItem("one rank for every module", BY_RANK)
        self.mode_combo.addItem("per-module ranks keeping an energy share", BY_ENERGY)
        self.rank_spin = QSpinBox(minimum=1, maximum=1, value=1)
        self.rank_spin.setToolTip("every module keeps its largest k singular directions (never more than it has)")
        self.energy_spin = QDoubleSpinBox(minimum=10.0, maximum=100.0, value=95.0, decimals=1, singleStep=1.0)
        self.energy_spin.setSuffix(" %")
        self.energy_spin.setToolTip("each module keeps the fewest directions holding this share of its energy")
        self.preview = QLabel("")
        self.preview.setWordWrap(True)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("folder for the reduced adapter (created)")
        self.out_edit.setClearButtonEnabled(True)
        self.browse_out_btn = QPushButton("Browse…")
        self.measure_check = QCheckBox("Measure the cost on data")
        self.measure_check.setChecked(True)
        self.measure_check.setToolTip(
            "score the original and the reduced adapter (and the base) on the adapter's validation set, or the demo "
            "sets, in one mixed batch: KL from the original, Δloss with its 95 % interval"
        )
        self.data_label = QLabel("")
        self.data_label.setWordWrap(True)
        self.data_label.setStyleSheet("color: palette(mid);")
        self.data_btn = QPushButton("Data…")
        self.data_btn.setToolTip("measure on other files (JSONL, CSV, Parquet); cancel the dialog for the defaults")
        self._lay_out()
        self.suggestions.cellClicked.connect(self._use_suggestion)
        self.mode_combo.currentIndexChanged.connect(lambda _i: self.cut_changed.emit())
        self.rank_spin.valueChanged.connect(lambda _v: self.cut_changed.emit())
        self.energy_spin.valueChanged.connect(lambda _v: self.cut_changed.emit())

    def _lay_out(self) -> None:
        form = QFormLayout(self)
        form.addRow("Adapter", self.adapter_combo)
        form.addRow(self.suggestions)
        form.addRow("Mode", self.mode_combo)
        target_row = QHBoxLayout()
        self.rank_label, self.energy_label = QLabel("rank"), QLabel("energy")
        target_row.addWidget(self.rank_label)
        target_row.addWidget(self.rank_spin)
        target_row.addWidget(self.energy_label)
        target_row.addWidget(self.energy_spin)
        target_row.addStretch(1)
        form.addRow("Keep", target_row)
        form.addRow(self.preview)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.browse_out_btn)
        form.addRow("Save to", out_row)
        measure_row = QHBoxLayout()
        measure_row.addWidget(self.measure_check, 1)
        measure_row.addWidget(self.data_btn)
        form.addRow(measure_row)
        form.addRow(self.data_label)

    # -- values --------------------------------------------------------------------------------------------------------
    def set_adapters(self, names: list[str], *, choose_new: bool = True) -> None:
        """The adapters to choose from: a newly attached one is chosen (``choose_new``), else the choice stays."""
        refill_adapter_choices(self.adapter_combo, names, choose_new=choose_new)

    def mode(self) -> str:
        return str(self.mode_combo.currentData())

    def target(self) -> tuple[int | None, float | None]:
        """The cut as ``(rank, None)`` or ``(None, energy share in 0..1)``, by the mode."""
        if self.mode() == BY_RANK:
            return self.rank_spin.value(), None
        return None, self.energy_spin.value() / 100

    def name_suffix(self) -> str:
        """What the suggested output folder's name ends with: ``r4`` or ``e95``."""
        if self.mode() == BY_RANK:
            return f"r{self.rank_spin.value()}"
        return f"e{self.energy_spin.value():g}"

    def show_suggestions(self, suggestions: list[Suggestion], max_rank: int) -> None:
        """One row per suggested cut; the rank box goes up to ``max_rank`` and starts at the 95 % suggestion."""
        self._suggestions = list(suggestions)
        self.rank_spin.blockSignals(True)
        self.rank_spin.setMaximum(max_rank)
        self.rank_spin.setValue(next(s.uniform_rank for s in suggestions if s.energy == DEFAULT_ENERGY))
        self.rank_spin.blockSignals(False)
        fill_suggestions(self.suggestions, suggestions)

    def clear_suggestions(self) -> None:
        self._suggestions = []
        self.suggestions.setRowCount(0)
        self.preview.setText("")
        self.data_label.setText("")

    def update_enabled(self, has_plan: bool) -> None:
        """The cut is editable once there is a plan; only the mode's own box shows."""
        self.data_btn.setEnabled(self.measure_check.isChecked())
        for widget in (self.mode_combo, self.rank_spin, self.energy_spin, self.suggestions):
            widget.setEnabled(has_plan)
        by_rank = self.mode() == BY_RANK
        for shown, widgets in (
            (by_rank, (self.rank_label, self.rank_spin)),
            (not by_rank, (self.energy_label, self.energy_spin)),
        ):
            for box in widgets:  # a box's label goes with it
                box.setVisible(shown)

    def _use_suggestion(self, row: int, column: int) -> None:
        if not 0 <= row < len(self._suggestions):
            return
        s = self._suggestions[row]
        self.mode_combo.setCurrentIndex(1 if column == 2 else 0)
        self.rank_spin.setValue(s.uniform_rank)
        self.energy_spin.setValue(100 * s.energy)


def _suggestions_table() -> QTableWidget:
    table = QTableWidget(0, 4)
    table.setHorizontalHeaderLabels(["energy", "one rank", "per module", "parameters"])
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.verticalHeader().setVisible(False)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    table.verticalHeader().setDefaultSectionSize(ROW_HEIGHT)
    table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    table.setFixedHeight(table.horizontalHeader().sizeHint().height() + 3 * ROW_HEIGHT + 4)
    table.setToolTip(
        "the smallest cut keeping 90/95/99 % of the update's energy (Σσ² of each ΔW): one rank for every "
        "module, or each module at its own rank (parameters: one rank / per module). Click a row to use it"
    )
    return table


def fill_suggestions(table: QTableWidget, suggestions: list[Suggestion]) -> None:
    """One centred row per suggestion: the energy share, one rank, the per-module ranks, the parameters."""
    table.setRowCount(0)
    table.setRowCount(len(suggestions))
    for r, s in enumerate(suggestions):
        cells = [
            f"{100 * s.energy:g} %",
            str(s.uniform_rank),
            f"≤ {s.per_module_max_rank}",
            f"{thousands(s.uniform_params)} / {thousands(s.per_module_params)}",
        ]
        for c, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            table.setItem(r, c, item)


def thousands(n: int) -> str:
    """A parameter count in M or k."""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e3 else str(n)
