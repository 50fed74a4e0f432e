"""The pieces of the Merge tab: an adapter row, the plan table (what each engine needs). The result box is
merge_result.py's."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)
from superqt import QDoubleSlider

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.combinations import CombinationMember, member_from_config
from lora_studio.core.errors import UserError
from lora_studio.core.export import GGUF_FORMATS
from lora_studio.core.merge import MergePlan
from lora_studio.core.system.memory import format_bytes
from lora_studio.gui.base.widgets import STYLES

ENGINES = ("streaming", "in-memory")
WEIGHT_RANGE = (0.0, 2.0)


class AdapterRow:
    """One attached adapter: a checkbox (merge it?), its rank, and its weight in a combination (a slider and a
    spin box that types it, kept in sync)."""

    def __init__(self, name: str, path: str, mergeable: bool) -> None:
        self.name, self.path, self.mergeable = name, path, mergeable
        # what a combination type needs to know about it (its config; a folder-less preview combination has none)
        self.member: CombinationMember | None = None
        if mergeable:
            try:
                self.member = member_from_config(name, adapter_files.read_adapter_config(Path(path)))
            except UserError:
                self.member = None  # the plan says what is wrong with the folder
        self.check = QCheckBox(name)
        self.check.setToolTip(
            path if mergeable else f"{path}\n(a combination built for Compare: tick its adapters here to merge it)"
        )
        self.check.setEnabled(mergeable)
        self.rank_label = QLabel(self.member.rank_text if self.member else "")
        self.rank_label.setStyleSheet("color: palette(mid);")
        self.rank_label.setToolTip(
            "the adapter's LoRA rank (linear, ties, dare_* and magnitude_prune need equal ranks)"
        )
        tip = f"weight of this adapter in the combination ({WEIGHT_RANGE[0]:g}–{WEIGHT_RANGE[1]:g})"
        self.slider = QDoubleSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(*WEIGHT_RANGE)
        self.slider.setSingleStep(0.05)
        self.slider.setMinimumWidth(140)
        self.slider.setToolTip(tip)
        self.spin = QDoubleSpinBox()
        self.spin.setRange(*WEIGHT_RANGE)
        self.spin.setDecimals(2)
        self.spin.setSingleStep(0.05)
        self.spin.setKeyboardTracking(False)  # typing "0.75" is one change, not "0", "0.", "0.7", "0.75"
        self.spin.setToolTip(tip + "; type a value")
        self.slider.setValue(1.0)
        self.spin.setValue(1.0)
        self.slider.valueChanged.connect(self._slider_moved)
        self.spin.valueChanged.connect(self._spin_typed)

    def _slider_moved(self, value: float) -> None:
        self.spin.blockSignals(True)  # the slider already announced the change
        self.spin.setValue(round(float(value), 2))
        self.spin.blockSignals(False)

    def _spin_typed(self, value: float) -> None:
        if abs(float(self.slider.value()) - value) > 1e-9:
            self.slider.setValue(value)  # its valueChanged tells the picker

    def set_weight(self, value: float) -> None:
        self.slider.setValue(value)

    def set_enabled(self, enabled: bool) -> None:
        self.slider.setEnabled(enabled)
        self.spin.setEnabled(enabled)

    def widgets(self) -> tuple[QWidget, ...]:
        return (self.check, self.rank_label, self.slider, self.spin)

    @property
    def checked(self) -> bool:
        return self.mergeable and self.check.isChecked()

    @property
    def weight(self) -> float:
        return round(float(self.slider.value()), 4)


class PlanTable(QGroupBox):
    """Before starting: each engine's predicted peak RAM/VRAM and verification RAM, and the disk check."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Before starting: what each engine needs", parent)
        grid = QGridLayout()
        grid.setHorizontalSpacing(16)
        for col, title in enumerate(("engine", "peak RAM", "peak VRAM", "+ verification RAM", "")):
            grid.addWidget(QLabel(f"<b>{title}</b>"), 0, col)
        self.cells: dict[str, list[QLabel]] = {}
        for row, engine in enumerate(ENGINES, start=1):
            cells = [QLabel(engine)] + [QLabel("–") for _ in range(4)]
            cells[4].setWordWrap(True)
            cells[4].setStyleSheet("color: palette(mid);")
            cells[4].setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
            for col, cell in enumerate(cells):
                grid.addWidget(cell, row, col)
            self.cells[engine] = cells
        grid.setColumnStretch(4, 1)
        self.disk_label = QLabel("")
        self.disk_label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addLayout(grid)
        layout.addWidget(self.disk_label)

    def show_plan(self, plan: MergePlan | None, out: Path | None) -> None:
        for engine, cells in self.cells.items():
            pred = plan.predictions.get(engine) if plan else None
            chosen = plan is not None and plan.engine == engine
            cells[0].setText(f"<b>→ {engine}</b>" if chosen else engine)
            if pred is None:
                for c in cells[1:]:
                    c.setText("–")
                continue
            cells[1].setText(format_bytes(pred.peak_ram_bytes))
            cells[2].setText(format_bytes(pred.peak_vram_bytes) if pred.peak_vram_bytes else "–")
            cells[3].setText(format_bytes(pred.verify_ram_bytes) if pred.verify_ram_bytes else "–")
            cells[4].setText(pred.reason if pred.available else f"not available: {pred.reason}")
            cells[4].setToolTip(cells[4].text())
            for c in cells[:4]:
                c.setStyleSheet("" if pred.available else "color: palette(mid);")
        if plan is None:
            self.disk_label.setText("")
        elif out is None:
            self.disk_label.setText(f"Disk: the output needs about {format_bytes(plan.output_bytes)}.")
            self.disk_label.setStyleSheet("")
        else:
            free = "unknown" if plan.disk_free_bytes is None else format_bytes(plan.disk_free_bytes)
            mark = "✔" if plan.disk_ok else "✖"
            self.disk_label.setText(
                f"Disk: {mark} the output needs about {format_bytes(plan.output_bytes)}; {free} free at {out.parent}"
            )
            self.disk_label.setStyleSheet(STYLES["ok"] if plan.disk_ok else STYLES["error"])


def engine_note(plan: MergePlan, explicit_engine: bool, safe_merge: bool) -> str:
    """Why auto picked the engine it did ('' for an explicit choice: a refusal is shown beside the Merge button)."""
    stream = plan.predictions["streaming"]
    if explicit_engine:
        return ""
    if plan.engine == "streaming":
        return "auto → streaming: reads and writes one tensor at a time"
    if plan.engine == "in-memory":
        if safe_merge and stream.available:
            why = "safe merge is PEFT's check, done in memory"
        else:
            why = f"streaming does not apply: {stream.reason}"
        return f"auto → in-memory ({why})"
    return ""


class RunRow(QWidget):
    """Merge (or Export GGUF), Cancel, the job's progress bar, and why Merge may not start."""

    def __init__(self, progress: QWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.merge_btn = QPushButton("Merge && save")
        self.merge_btn.setDefault(True)
        self.merge_btn.setMinimumWidth(130)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.reason_label = QLabel("")
        self.reason_label.setWordWrap(True)
        self.reason_label.setStyleSheet(STYLES["warn"])
        for b in (self.merge_btn, self.cancel_btn):
            b.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.merge_btn)
        row.addWidget(self.cancel_btn)
        row.addWidget(progress, 1)
        row.addWidget(self.reason_label, 1)
        row.addStretch(0)


def start_reason(
    *,
    busy: str,
    has_base: bool,
    output_format: str,
    attached: int,
    ticked: int,
    plan_error: str,
    plan_pending: bool,
    has_out: bool,
    plan: MergePlan | None,
) -> str:
    """'' when Merge (or Export) may start; otherwise why not, the first reason in the order a user fixes them."""
    export = output_format != "hf"
    gguf_base_only = output_format == "gguf"  # a GGUF of the base alone needs no adapter
    if busy:
        return busy
    if not has_base:
        return "load a base model first"
    if not attached and not gguf_base_only:
        return "attach an adapter first (Adapters tab)"
    if not ticked and not gguf_base_only:
        return "tick the adapter(s) to merge"
    if plan_error and not plan_pending:
        return plan_error  # what is wrong with the request comes before where to save it
    if not has_out:
        return "choose the .gguf file" if output_format in GGUF_FORMATS else "choose an output folder"
    if plan_pending:
        return "checking what the export needs…" if export else "checking what the merge needs…"
    if plan is not None and plan.refusal:
        hint = f" ({plan.refusal_hint})" if plan.refusal_hint else ""
        return f"cannot start: {plan.refusal}{hint}"
    return ""
