"""The Evaluate tab's inputs: the Data box (the evaluation files, a row limit) and the Variants box (what to
score, and the reference the changes are measured against).

Both take values and answer with signals: the panel decides what "Add file…", "Defaults" and "Add GGUF…" do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

KIND_TIPS = {"merged": "a merged folder loaded in Compare"}


class DataBox(QGroupBox):
    """The evaluation files, with Add file… / Remove / Defaults, and how many rows of each to score."""

    add_requested = Signal()
    defaults_requested = Signal()
    removed = Signal()  # the user removed files: the list is the user's now

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Data", parent)
        self.data_list = QListWidget()
        self.data_list.setToolTip("the evaluation files: JSONL, CSV, Parquet or save_to_disk folders")
        self.data_list.setMaximumHeight(96)
        self.add_data_btn = QPushButton("Add file…")
        self.remove_data_btn = QPushButton("Remove")
        self.default_data_btn = QPushButton("Defaults")
        self.default_data_btn.setToolTip("the attached adapters' validation sets, else the demo validation sets")
        self.limit_spin = QSpinBox(minimum=0, maximum=100000, value=0)
        self.limit_spin.setSpecialValueText("all rows")
        self.limit_spin.setToolTip("evaluate the first N rows of each file (all rows: 0)")
        self.limit_spin.setMinimumWidth(self.limit_spin.sizeHint().width())  # "all rows" whole in a narrow pane
        grid = QGridLayout(self)
        grid.addWidget(self.data_list, 0, 0, 1, 4)
        grid.addWidget(self.add_data_btn, 1, 0)
        grid.addWidget(self.remove_data_btn, 1, 1)
        grid.addWidget(self.default_data_btn, 1, 2)
        grid.addWidget(self.limit_spin, 1, 3)
        self.add_data_btn.clicked.connect(lambda: self.add_requested.emit())
        self.default_data_btn.clicked.connect(lambda: self.defaults_requested.emit())
        self.remove_data_btn.clicked.connect(self._remove_selected)

    def files(self) -> list[Path]:
        return [Path(self.data_list.item(i).text()) for i in range(self.data_list.count())]

    def set_files(self, paths: list[Path]) -> None:
        self.data_list.clear()
        for path in paths:
            self.data_list.addItem(str(path))

    def limit(self) -> int | None:
        """The rows to score of each file; None: all of them."""
        return self.limit_spin.value() or None

    def _remove_selected(self) -> None:
        for item in self.data_list.selectedItems():
            self.data_list.takeItem(self.data_list.row(item))
        self.removed.emit()


class VariantsBox(QGroupBox):
    """A checkable list of variants (name and kind) and the reference picked among the ticked ones."""

    changed = Signal()  # the ticks changed (the reference choices follow)
    add_gguf_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Variants", parent)
        self.variant_list = QListWidget()
        self.variant_list.setToolTip("tick the variants to score; every adapter runs in one mixed batch")
        self.add_gguf_btn = QPushButton("Add GGUF…")
        self.add_gguf_btn.setToolTip("score a GGUF export in llama.cpp (needs llama-cpp-python)")
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("KL and Δloss are measured against this variant")
        layout = QVBoxLayout(self)
        layout.addWidget(self.variant_list, 1)
        ref_row = QHBoxLayout()
        ref_row.addWidget(QLabel("Reference"))
        ref_row.addWidget(self.reference_combo, 1)
        ref_row.addWidget(self.add_gguf_btn)
        layout.addLayout(ref_row)
        self.variant_list.itemChanged.connect(lambda _item: self._ticks_changed())
        self.add_gguf_btn.clicked.connect(lambda: self.add_gguf_requested.emit())

    @property
    def count(self) -> int:
        return self.variant_list.count()

    def show_variants(self, variants: list[tuple[str, str]], ggufs: Mapping[str, Path]) -> None:
        """One checkable row per ``(name, kind)``; a variant keeps its tick, a new one comes ticked."""
        ticked = {self.variant_list.item(i).text(): self.variant_list.item(i).checkState() for i in range(self.count)}
        self.variant_list.blockSignals(True)
        self.variant_list.clear()
        for name, kind in variants:
            item = QListWidgetItem(name)
            item.setData(Qt.ItemDataRole.UserRole, kind)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(ticked.get(name, Qt.CheckState.Checked))
            item.setToolTip(str(ggufs.get(name)) if kind == "gguf" else KIND_TIPS.get(kind, kind))
            self.variant_list.addItem(item)
        self.variant_list.blockSignals(False)
        self._ticks_changed()

    def ticked(self) -> list[tuple[str, str]]:
        """(name, kind) of the ticked variants, in list order."""
        items = [self.variant_list.item(i) for i in range(self.count)]
        return [(i.text(), i.data(Qt.ItemDataRole.UserRole)) for i in items if i.checkState() == Qt.CheckState.Checked]

    def set_ticked(self, names: list[str]) -> None:
        for i in range(self.count):
            item = self.variant_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

    def reference(self) -> str | None:
        return self.reference_combo.currentText() or None

    def _ticks_changed(self) -> None:
        names = [name for name, _kind in self.ticked()]
        current = self.reference_combo.currentText()
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItems(names)
        if current in names:
            self.reference_combo.setCurrentText(current)
        elif "base" in names:
            self.reference_combo.setCurrentText("base")
        self.reference_combo.blockSignals(False)
        self.changed.emit()
