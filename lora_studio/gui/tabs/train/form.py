"""The Train tab's settings form: every TrainSettings field, with the guide's advice as tooltips."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.model.dtypes import DTYPES
from lora_studio.core.model.quantize import QUANTIZE_CHOICES
from lora_studio.core.train import ADVICE, INIT_METHODS, SCHEDULERS, TARGET_PRESETS, TrainSettings
from lora_studio.core.train.settings import CONVERTED_INITS
from lora_studio.gui.base.widgets import wheel_scrolls_past_fields

INIT_LABELS = {
    "default": "LoRA (default)",
    "gaussian": "LoRA, gaussian A",
    "olora": "OLoRA (QR)",
    "pissa": "PiSSA (SVD)",
}


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _double(low: float, high: float, value: float, decimals: int, step: float, tip: str) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(low, high)
    box.setDecimals(decimals)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


class TrainSettingsForm(QWidget):
    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        d = TrainSettings()
        self.r = _spin(1, 512, d.r, ADVICE["r"])
        self.alpha = _double(0.01, 4096, d.alpha, 1, 1, ADVICE["alpha"])
        self.dropout = _double(0, 0.9, d.dropout, 2, 0.01, ADVICE["dropout"])
        self.targets = QComboBox()
        self.targets.setEditable(True)
        self.targets.addItems(list(TARGET_PRESETS))
        self.targets.setToolTip(ADVICE["targets"] + " (or type module names, comma-separated)")
        self.init = QComboBox()
        for method in INIT_METHODS:
            self.init.addItem(INIT_LABELS[method], method)
        self.init.setToolTip(ADVICE["init"])
        self.rslora = QCheckBox("rsLoRA")
        self.rslora.setToolTip(ADVICE["rslora"])
        self.dora = QCheckBox("DoRA")
        self.dora.setToolTip(ADVICE["dora"])

        self.learning_rate = QLineEdit(f"{d.learning_rate:g}")
        self.learning_rate.setToolTip(ADVICE["learning_rate"])
        self.epochs = _double(0.1, 1000, d.epochs, 1, 1, ADVICE["epochs"])
        self.max_steps = _spin(0, 1_000_000, d.max_steps, ADVICE["max_steps"])
        self.max_steps.setSpecialValueText("epochs")
        self.batch_size = _spin(1, 4096, d.batch_size, ADVICE["batch_size"])
        self.grad_accum = _spin(1, 4096, d.grad_accum, ADVICE["grad_accum"])
        self.max_length = _spin(8, 131072, d.max_length, ADVICE["max_length"])
        self.warmup = _double(0, 0.99, d.warmup_ratio, 2, 0.01, ADVICE["warmup_ratio"])
        self.scheduler = QComboBox()
        self.scheduler.addItems(list(SCHEDULERS))
        self.scheduler.setToolTip(ADVICE["scheduler"])
        self.seed = _spin(0, 2**31 - 1, d.seed, ADVICE["seed"])
        self.eval_steps = _spin(1, 1_000_000, d.eval_steps, ADVICE["eval_steps"])
        self.save_steps = _spin(1, 1_000_000, d.save_steps, ADVICE["save_steps"])
        self.val_fraction = _double(0, 0.9, d.val_fraction, 2, 0.05, ADVICE["val_fraction"])
        self.completion_only = QCheckBox("loss on the answers only")
        self.completion_only.setChecked(d.completion_only)
        self.completion_only.setToolTip(ADVICE["completion_only"])
        self.dtype = QComboBox()
        self.dtype.addItems(list(DTYPES))
        self.dtype.setCurrentText(d.dtype)
        self.dtype.setToolTip("float32 on the CPU; bfloat16 on a recent GPU")
        self.device = QComboBox()
        self.device.addItem("cpu")
        self.quantize = QComboBox()
        self.quantize.addItem("none (LoRA)", None)
        for kind in QUANTIZE_CHOICES:
            self.quantize.addItem(f"{kind} (QLoRA)", kind)
        self.quantize.setToolTip(ADVICE["quantize"])
        self.keep = QComboBox()
        self.keep.addItems(["best", "last"])
        self.keep.setToolTip("save the weights with the best validation loss, or those of the last step")
        self.baseline = QCheckBox("also run a full fine-tuning baseline")
        self.baseline.setToolTip("every weight trained on the same data and steps (models up to 500 M parameters)")

        adapter = QFormLayout()
        adapter.addRow("Rank r", self.r)
        adapter.addRow("Alpha", self.alpha)
        adapter.addRow("Dropout", self.dropout)
        adapter.addRow("Targets", self.targets)
        adapter.addRow("Init", self.init)
        adapter.addRow(self.rslora, self.dora)
        adapter_box = QGroupBox("Adapter")
        adapter_box.setLayout(adapter)
        run = QFormLayout()
        run.addRow("Learning rate", self.learning_rate)
        run.addRow("Epochs", self.epochs)
        run.addRow("Max steps", self.max_steps)
        run.addRow("Batch size", self.batch_size)
        run.addRow("Grad. accumulation", self.grad_accum)
        run.addRow("Max length", self.max_length)
        run.addRow("Warm-up ratio", self.warmup)
        run.addRow("Scheduler", self.scheduler)
        run.addRow("Seed", self.seed)
        run.addRow("Evaluate every", self.eval_steps)
        run.addRow("Checkpoint every", self.save_steps)
        run.addRow("Hold out (no val. file)", self.val_fraction)
        run.addRow(self.completion_only)
        run.addRow("Dtype", self.dtype)
        run.addRow("Device", self.device)
        run.addRow("Quantize base", self.quantize)
        run.addRow("Keep", self.keep)
        run.addRow(self.baseline)
        run_box = QGroupBox("Run")
        run_box.setLayout(run)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(adapter_box)
        layout.addWidget(run_box)
        # the wheel scrolls the pane: a field changes by it only once clicked (a scroll over the form changed the
        # rank, the steps or the scheduler on the way down)
        self._wheel_guard = wheel_scrolls_past_fields(self)
        for spin in self.findChildren(QSpinBox) + self.findChildren(QDoubleSpinBox):
            spin.valueChanged.connect(self.changed)
        for combo in self.findChildren(QComboBox):
            combo.currentTextChanged.connect(self.changed)
        for check in self.findChildren(QCheckBox):
            check.toggled.connect(self.changed)
        self.learning_rate.textChanged.connect(self.changed)
        self.quantize.currentIndexChanged.connect(self._quantize_changed)

    def _quantize_changed(self, *_args: object) -> None:
        """QLoRA: OLoRA and PiSSA rewrite the base weights, which a quantised base holds only re-quantised."""
        quantised = self.quantize.currentData() is not None
        model = self.init.model()
        for i in range(self.init.count()):
            if self.init.itemData(i) in CONVERTED_INITS:
                model.item(i).setEnabled(not quantised)  # type: ignore[attr-defined]  # a QStandardItemModel
        if quantised and self.init.currentData() in CONVERTED_INITS:
            self.init.setCurrentIndex(max(0, self.init.findData("default")))

    def set_devices(self, devices: list[str]) -> None:
        current = self.device.currentText()
        self.device.clear()
        self.device.addItems(devices)
        if current in devices:
            self.device.setCurrentText(current)

    def settings(self) -> TrainSettings:
        """The form's values (may not pass ``check()``: the run says what is wrong)."""
        try:
            lr = float(self.learning_rate.text())
        except ValueError:
            lr = float("nan")
        targets = tuple(t.strip() for t in self.targets.currentText().split(",") if t.strip())
        return TrainSettings(
            r=self.r.value(),
            alpha=self.alpha.value(),
            dropout=self.dropout.value(),
            targets=targets,
            init=self.init.currentData(),
            rslora=self.rslora.isChecked(),
            dora=self.dora.isChecked(),
            learning_rate=lr,
            epochs=self.epochs.value(),
            max_steps=self.max_steps.value(),
            batch_size=self.batch_size.value(),
            grad_accum=self.grad_accum.value(),
            max_length=self.max_length.value(),
            warmup_ratio=self.warmup.value(),
            scheduler=self.scheduler.currentText(),
            seed=self.seed.value(),
            eval_steps=self.eval_steps.value(),
            save_steps=self.save_steps.value(),
            val_fraction=self.val_fraction.value(),
            completion_only=self.completion_only.isChecked(),
            dtype=self.dtype.currentText(),
            device=self.device.currentText(),
            quantize=self.quantize.currentData(),
            keep=self.keep.currentText(),
            baseline=self.baseline.isChecked(),
        )

    def follow_quantize(self, kind: str | None) -> None:
        """Quantize base as the session's base was loaded (none for a full-precision one)."""
        self.quantize.setCurrentIndex(max(0, self.quantize.findData(kind)) if kind in QUANTIZE_CHOICES else 0)

    def set_settings(self, s: TrainSettings) -> None:
        self.r.setValue(s.r)
        self.alpha.setValue(s.alpha)
        self.init.setCurrentIndex(max(0, self.init.findData(s.init)))
        self.max_steps.setValue(s.max_steps)
        self.epochs.setValue(s.epochs)
        self.learning_rate.setText(f"{s.learning_rate:g}")
        self.eval_steps.setValue(s.eval_steps)
        self.batch_size.setValue(s.batch_size)
        self.quantize.setCurrentIndex(max(0, self.quantize.findData(s.quantize)) if s.quantize else 0)
