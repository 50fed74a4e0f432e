"""The Compare tab's variant list: which variants become columns, and which one is the reference.

Variants are the base (adapters off), every adapter on the session (weighted combinations included:
they are session adapters) and merged model folders loaded read-only beside the session. The list
follows the session snapshots it is shown; merged folders are held here as opaque references (the
GUI thread never calls into them) until they are unloaded or the base changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.session import MAX_SCALE, SessionState
from lora_studio.gui.base.beside_store import BesideModels
from lora_studio.gui.tabs.compare.columns import KIND_ADAPTER, KIND_BASE, KIND_MERGED

if TYPE_CHECKING:
    from lora_studio.core.compare import BesideModel, Variant

SLIDER_STEPS_PER_UNIT = 20  # the slider moves in steps of 0.05
SLIDER_MAX = 2.0  # the slider's range; the box beside it goes to MAX_SCALE
SCALE_SETTLE_MS = 350  # a scale is applied once the slider rests this long


MAX_NEW_TICKED = 4  # four columns fit a 1280-pixel window; a variant added beyond them arrives unticked


class VariantPicker(QGroupBox):
    ticks_changed = Signal()  # the ticked variants (or the reference choices) changed
    current_changed = Signal()  # another row is selected (the Remove button follows it)
    scale_changed = Signal(str, float)  # (adapter, scale): the user set an adapter's LoRA scale

    def __init__(self, store: BesideModels, parent: QWidget | None = None) -> None:
        super().__init__("Variants", parent)
        self.state: SessionState | None = None
        self.store = store  # the merged folders loaded beside the session (the window's one store)
        self.unticked: set[str] = set()  # remembered across list refreshes; new variants start ticked (a few)
        self._listed: set[str] = set()  # the variants the list showed last
        self._scale_free = True  # no model job runs: a scale may be set
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
        # the selected adapter's LoRA scale (PEFT's set_scale: no merge); the tab runs again when it settles
        self.scale_slider = QSlider(Qt.Orientation.Horizontal)
        self.scale_slider.setRange(0, int(SLIDER_MAX * SLIDER_STEPS_PER_UNIT))
        self.scale_slider.setValue(SLIDER_STEPS_PER_UNIT)
        self.scale_spin = QDoubleSpinBox(minimum=0.0, maximum=MAX_SCALE, value=1.0, decimals=2, singleStep=0.05)
        self.scale_spin.setKeyboardTracking(False)
        self.scale_label = QLabel("Scale")
        scale_row = QHBoxLayout()
        scale_row.addWidget(self.scale_label)
        scale_row.addWidget(self.scale_slider, 1)
        scale_row.addWidget(self.scale_spin)
        layout.addLayout(scale_row)
        self._settle = QTimer(self)
        self._settle.setSingleShot(True)
        self._settle.setInterval(SCALE_SETTLE_MS)
        self._settle.timeout.connect(self._emit_scale)
        self.scale_slider.valueChanged.connect(self._slider_moved)
        self.scale_spin.valueChanged.connect(self._spin_changed)
        self.variant_list.currentItemChanged.connect(lambda *_: self._show_scale())
        self._show_scale()

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
        variants = self.available_variants()
        ticked = sum(1 for name, _ in variants if name in self._listed and name not in self.unticked)
        for name, _kind in variants:
            if name not in self._listed and name not in self.unticked:
                # a variant new to the list starts ticked while the columns still fit the window
                if ticked >= MAX_NEW_TICKED:
                    self.unticked.add(name)
                else:
                    ticked += 1
        self._listed = {name for name, _ in variants}
        for name, kind in variants:
            scale = self.state.scale_of(name) if self.state and kind == KIND_ADAPTER else 1.0
            scaled = f"{name}  ×{scale:g}" if scale != 1.0 else name
            label = {KIND_BASE: f"{name}", KIND_ADAPTER: scaled, KIND_MERGED: f"{name} (merged folder)"}[kind]
            item = QListWidgetItem(label)
            item.setData(Qt.ItemDataRole.UserRole, (name, kind))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if name in self.unticked else Qt.CheckState.Checked)
            tip = {
                KIND_BASE: "the base model with every adapter disabled",
                KIND_ADAPTER: paths.get(name, ""),
                KIND_MERGED: f"{self.store.path(name)}\nloaded read-only beside the session",
            }[kind]
            item.setToolTip(tip)
            self.variant_list.addItem(item)
            if (name, kind) == current:
                self.variant_list.setCurrentItem(item)
        self.variant_list.blockSignals(False)
        self._ticks_changed()
        self._show_scale()

    # -- the selected adapter's scale ----------------------------------------------------------------------------------
    def selected_adapter(self) -> str | None:
        item = self.variant_list.currentItem()
        if item is None or item.data(Qt.ItemDataRole.UserRole)[1] != KIND_ADAPTER:
            return None
        return item.data(Qt.ItemDataRole.UserRole)[0]

    def _show_scale(self) -> None:
        name = self.selected_adapter()
        scale = self.state.scale_of(name) if self.state and name else 1.0
        for widget in (self.scale_slider, self.scale_spin):
            widget.blockSignals(True)
        self.scale_spin.setValue(scale)
        self.scale_slider.setValue(round(min(scale, SLIDER_MAX) * SLIDER_STEPS_PER_UNIT))
        for widget in (self.scale_slider, self.scale_spin):
            widget.blockSignals(False)
        self._scale_enabled()

    def _scale_enabled(self) -> None:
        name = self.selected_adapter()
        on = self._scale_free and name is not None
        tip = (
            f"{name}'s LoRA scale: 0 is the base, 1 the adapter as trained (PEFT's set_scale, no merge); "
            "the comparison runs again when it settles"
            if name
            else "select an adapter in the list to change its scale"
        )
        for widget in (self.scale_slider, self.scale_spin, self.scale_label):
            widget.setEnabled(on)
            widget.setToolTip(tip)

    def _slider_moved(self, value: int) -> None:
        self.scale_spin.blockSignals(True)
        self.scale_spin.setValue(value / SLIDER_STEPS_PER_UNIT)
        self.scale_spin.blockSignals(False)
        self._settle.start()

    def _spin_changed(self, value: float) -> None:
        self.scale_slider.blockSignals(True)
        self.scale_slider.setValue(round(min(value, SLIDER_MAX) * SLIDER_STEPS_PER_UNIT))
        self.scale_slider.blockSignals(False)
        self._settle.start()

    def _emit_scale(self) -> None:
        name = self.selected_adapter()
        if name is not None and self.state is not None and self.scale_spin.value() != self.state.scale_of(name):
            self.scale_changed.emit(name, float(self.scale_spin.value()))

    def set_scale_now(self, name: str, scale: float) -> None:
        """Select ``name`` and set its scale as the user would, without waiting for the slider to settle."""
        self.select(name)
        self.scale_spin.setValue(scale)
        self._settle.stop()
        self._emit_scale()

    def select(self, name: str) -> None:
        for i in range(self.variant_list.count()):
            if self.variant_list.item(i).data(Qt.ItemDataRole.UserRole)[0] == name:
                self.variant_list.setCurrentRow(i)

    # -- ticks and the reference ---------------------------------------------------------------------------------------
    def ticked(self) -> list[tuple[str, str]]:
        out = []
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(tuple(item.data(Qt.ItemDataRole.UserRole)))
        return out

    def set_ticked(self, names: Iterable[str]) -> None:
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

    @property
    def merged(self) -> Mapping[str, BesideModel]:
        """Column name -> merged model loaded beside the session (opaque here)."""
        return self.store.models

    def core_variants(self, ticked: list[tuple[str, str]]) -> list[Variant]:
        """The core variant of each ticked (name, kind): the base, an adapter or a merged folder held here."""
        from lora_studio.core.compare import Variant

        out = []
        for name, kind in ticked:
            if kind == KIND_BASE:
                out.append(Variant.base(name))
            elif kind == KIND_ADAPTER:
                out.append(Variant.of_adapter(name))
            else:
                out.append(Variant.merged(self.merged[name], name))
        return out

    def merged_named_for(self, path: str) -> str | None:
        """The column name of the merged folder at ``path`` when it is already loaded beside the session."""
        return self.store.named_for(path)

    def _ticks_changed(self, *_args: object) -> None:
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

    def add_merged(self, name: str, beside: BesideModel, path: str) -> None:
        self.unticked.discard(name)
        self.store.add(name, beside, path)
        self.fill()

    def take_merged(self, names: list[str] | None = None) -> list[BesideModel]:
        """Forget merged folders (all of them by default); returns their references for the caller to release."""
        return self.store.take(names)

    def update_buttons(self, reason: str, running: bool) -> None:
        """``reason``: why nothing may be loaded now ('' when it may); ``running``: a comparison runs."""
        self.add_merged_btn.setEnabled(not reason)
        self.add_merged_btn.setToolTip(reason or "load a merged model folder read-only beside the session, as a column")
        self._scale_free = not reason and not running
        self._scale_enabled()
        removable = self.selected_merged() is not None and not running
        self.remove_btn.setEnabled(removable)
        self.remove_btn.setToolTip(
            "unload the selected merged folder"
            if removable
            else "select a merged folder to unload it (delete adapters in the Adapters tab)"
        )
