"""The Compare tab's variant list: which variants become columns, and which one is the reference.

Variants are the base (adapters off), every adapter on the session (weighted combinations included:
they are session adapters) and merged model folders loaded read-only beside the session. The list
follows the session snapshots it is shown; merged folders are held here as opaque references (the
GUI thread never calls into them) until they are unloaded or the base changes.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.session import SessionState
from lora_studio.gui.compare_columns import KIND_ADAPTER, KIND_BASE, KIND_MERGED


class VariantPicker(QGroupBox):
    ticks_changed = Signal()  # the ticked variants (or the reference choices) changed
    current_changed = Signal()  # another row is selected (the Remove button follows it)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Variants", parent)
        self.state: SessionState | None = None
        self.merged: dict[str, Any] = {}  # column name -> BesideModel (opaque here)
        self.merged_paths: dict[str, str] = {}
        self.unticked: set[str] = set()  # remembered across list refreshes; new variants start ticked
        self.variant_list = QListWidget()
        self.variant_list.setToolTip("ticked variants become columns")
        self.variant_list.itemChanged.connect(self._ticks_changed)
        self.variant_list.currentItemChanged.connect(lambda *_: self.current_changed.emit())
        self.add_merged_btn = QPushButton("Add merged folder…")
        self.remove_btn = QPushButton("Remove")
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("divergence and KL are measured against this column (applies to the next run)")
        layout = QVBoxLayout(self)
        layout.addWidget(self.variant_list, 1)
        row = QHBoxLayout()
        row.addWidget(self.add_merged_btn, 1)
        row.addWidget(self.remove_btn)
        layout.addLayout(row)
        ref_row = QHBoxLayout()
        ref_row.addWidget(QLabel("Reference"))
        ref_row.addWidget(self.reference_combo, 1)
        layout.addLayout(ref_row)

    # -- what is listed ------------------------------------------------------------------------------------------------
    def base_name(self) -> str:
        adapters = {a[0] for a in self.state.adapters} if self.state else set()
        return "base" if "base" not in adapters else "base (adapters off)"

    def available_variants(self) -> list[tuple[str, str]]:
        """(name, kind) of every variant that can be ticked, in display order."""
        if not self.state or not self.state.base:
            return []
        out = [(self.base_name(), KIND_BASE)]
        out += [(name, KIND_ADAPTER) for name, _path, _size in self.state.adapters]
        out += [(name, KIND_MERGED) for name in self.merged]
        return out

    def show_state(self, state: SessionState) -> None:
        self.state = state
        self.fill()

    def fill(self) -> None:
        """Rebuild the list from the state and the merged folders, keeping ticks and the selected row."""
        paths = {name: path for name, path, _ in (self.state.adapters if self.state else ())}
        self.variant_list.blockSignals(True)
        current = (
            self.variant_list.currentItem().data(Qt.ItemDataRole.UserRole) if self.variant_list.currentItem() else None
        )
        self.variant_list.clear()
        for name, kind in self.available_variants():
            label = {KIND_BASE: f"{name}", KIND_ADAPTER: name, KIND_MERGED: f"{name} (merged folder)"}[kind]
            item = QListWidgetItem(label)
            item.setData(Qt.ItemDataRole.UserRole, (name, kind))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if name in self.unticked else Qt.CheckState.Checked)
            tip = {
                KIND_BASE: "the base model with every adapter disabled",
                KIND_ADAPTER: paths.get(name, ""),
                KIND_MERGED: f"{self.merged_paths.get(name, '')}\nloaded read-only beside the session",
            }[kind]
            item.setToolTip(tip)
            self.variant_list.addItem(item)
            if (name, kind) == current:
                self.variant_list.setCurrentItem(item)
        self.variant_list.blockSignals(False)
        self._ticks_changed()

    # -- ticks and the reference ---------------------------------------------------------------------------------------
    def ticked(self) -> list[tuple[str, str]]:
        out = []
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(tuple(item.data(Qt.ItemDataRole.UserRole)))
        return out

    def set_ticked(self, names) -> None:
        """Tick exactly ``names`` (and untick the rest)."""
        names = set(names)
        self.variant_list.blockSignals(True)
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            name = item.data(Qt.ItemDataRole.UserRole)[0]
            item.setCheckState(Qt.CheckState.Checked if name in names else Qt.CheckState.Unchecked)
        self.variant_list.blockSignals(False)
        self._ticks_changed()

    def reference(self) -> str | None:
        return self.reference_combo.currentText() or None

    def set_reference(self, name: str) -> None:
        """Make the ticked variant ``name`` the reference (for the next run)."""
        if self.reference_combo.findText(name) >= 0:
            self.reference_combo.setCurrentText(name)

    def merged_named_for(self, path: str) -> str | None:
        """The column name of the merged folder at ``path`` when it is already loaded beside the session."""
        for name, held in self.merged_paths.items():
            if held == path and name in self.merged:
                return name
        return None

    def _ticks_changed(self, *_args) -> None:
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            name = item.data(Qt.ItemDataRole.UserRole)[0]
            if item.checkState() == Qt.CheckState.Checked:
                self.unticked.discard(name)
            else:
                self.unticked.add(name)
        ticked = [name for name, _ in self.ticked()]
        chosen = self.reference_combo.currentText()
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItems(ticked)
        default = self.base_name() if self.base_name() in ticked else (ticked[0] if ticked else "")
        self.reference_combo.setCurrentText(chosen if chosen in ticked else default)
        self.reference_combo.blockSignals(False)
        self.ticks_changed.emit()

    # -- merged folders ------------------------------------------------------------------------------------------------
    def selected_merged(self) -> str | None:
        item = self.variant_list.currentItem()
        if item is None or item.data(Qt.ItemDataRole.UserRole)[1] != KIND_MERGED:
            return None
        return item.data(Qt.ItemDataRole.UserRole)[0]

    def add_merged(self, name: str, beside: Any, path: str) -> None:
        self.merged[name] = beside
        self.merged_paths[name] = path
        self.unticked.discard(name)
        self.fill()

    def take_merged(self, names: list[str] | None = None) -> list[Any]:
        """Forget merged folders (all of them by default); returns their references for the caller to release."""
        names = list(self.merged) if names is None else names
        held = [self.merged.pop(n) for n in names if n in self.merged]
        for n in names:
            self.merged_paths.pop(n, None)
        return held

    def update_buttons(self, reason: str, running: bool) -> None:
        """``reason``: why nothing may be loaded now ('' when it may); ``running``: a comparison runs."""
        self.add_merged_btn.setEnabled(not reason)
        self.add_merged_btn.setToolTip(reason or "load a merged model folder read-only beside the session, as a column")
        removable = self.selected_merged() is not None and not running
        self.remove_btn.setEnabled(removable)
        self.remove_btn.setToolTip(
            "unload the selected merged folder"
            if removable
            else "select a merged folder to unload it (delete adapters in the Adapters tab)"
        )
