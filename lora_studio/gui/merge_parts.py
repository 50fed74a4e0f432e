"""The pieces of the Merge tab: an adapter row, the plan table (what each engine needs), the result box."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)
from superqt import QDoubleSlider

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.combinations import CombinationMember, member_from_config
from lora_studio.core.errors import UserError
from lora_studio.core.merge import MergePlan
from lora_studio.core.system.memory import format_bytes
from lora_studio.gui.widgets import STYLES

ENGINES = ("streaming", "in-memory")
BADGES = {
    "pass": (
        "✔ verified",
        "color: white; background: #2a7a2a; padding: 3px 8px; border-radius: 4px; font-weight: bold;",
    ),
    "warn": ("⚠ check", "color: white; background: #c06000; padding: 3px 8px; border-radius: 4px; font-weight: bold;"),
    None: ("saved, not verified", "color: white; background: #777; padding: 3px 8px; border-radius: 4px;"),
}


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


class ResultBox(QGroupBox):
    """The verification badge and numbers of the last merge, where it was saved, and what to do with it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Result", parent)
        self.badge = QLabel("")
        self.badge.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.numbers = QLabel("")
        self.numbers.setWordWrap(True)
        self.numbers.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.saved_label = QLabel("")
        self.saved_label.setWordWrap(True)
        self.saved_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.card_btn = QPushButton("Open model card")
        self.folder_btn = QPushButton("Open folder")
        self.compare_merged_btn = QPushButton("Compare merged vs adapter")
        badge_row = QHBoxLayout()
        badge_row.addWidget(self.badge)
        badge_row.addWidget(self.numbers, 1)
        buttons = QHBoxLayout()
        for b in (self.card_btn, self.folder_btn, self.compare_merged_btn):
            buttons.addWidget(b)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addLayout(badge_row)
        layout.addWidget(self.saved_label)
        layout.addLayout(buttons)
        self.hide()

    def show_result(self, result: Any) -> None:
        """``result``: core.merge MergeResult (its verification may be None when verification was off)."""
        v = result.verification
        text, style = BADGES[v.status if v is not None else None]
        self.badge.setText(text)
        self.badge.setStyleSheet(style)
        if v is not None:
            limits = v.thresholds
            self.numbers.setText(
                f"max |Δlogit| {v.max_abs_logit_diff:.3g} (≤ {limits[0]:g}) · mean KL {v.mean_kl:.3g} "
                f"(≤ {limits[1]:g}) · greedy agreement {v.greedy_agreement:.0%} (≥ {limits[2]:.0%}) "
                f"over {v.tokens_compared} tokens, {v.dtype}"
            )
            self.numbers.setToolTip(
                "the saved folder, loaded with plain AutoModelForCausalLM, against base + adapter "
                "through PEFT on the same tokens"
            )
        else:
            self.numbers.setText("verification was off")
        self.saved_label.setText(
            f"Saved <b>{result.out}</b> — {result.engine} engine, {result.dtype}, "
            f"{len(result.files)} shard(s), {format_bytes(result.bytes_written)} in "
            f"{result.seconds:.1f} s"
        )
        self.show()


def card_markdown(text: str) -> str:
    """A model card for QTextBrowser.setMarkdown: its YAML front matter as a code block (Markdown would read
    ``key: value`` followed by ``---`` as a heading)."""
    if text.startswith("---\n"):
        head, sep, body = text[4:].partition("\n---\n")
        if sep:
            return f"```yaml\n{head}\n```\n\n{body}"
    return text


class CardDialog(QDialog):
    """A model card shown inside the app, read-only, rendered as Markdown (where no desktop app opens files)."""

    def __init__(self, path: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path = path
        self.setWindowTitle(f"Model card — {path.parent.name}")
        self.browser = QTextBrowser()
        self.browser.setOpenExternalLinks(False)
        self.browser.setReadOnly(True)
        try:
            text = path.read_text("utf-8", errors="replace")
        except OSError as exc:
            text = f"Cannot read {path}: {exc.strerror or exc}"
        self.text = text
        self.browser.setMarkdown(card_markdown(text))
        self.path_label = QLabel(str(path))
        self.path_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.path_label.setStyleSheet("color: palette(mid);")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.browser, 1)
        layout.addWidget(self.path_label)
        layout.addWidget(buttons)
        self.resize(760, 560)
