"""The Evaluate tab's Scale page: pick an adapter, its scales and the data, chart a sweep, offer its best scale.

:class:`SweepBox` takes the attached adapters' names (:meth:`SweepBox.set_adapters`) and a finished
:class:`~lora_studio.core.evaluate.scale.ScaleSweep` (:meth:`SweepBox.show_sweep`); its buttons answer with
:attr:`~SweepBox.sweep_requested`, :attr:`~SweepBox.apply_requested` and :attr:`~SweepBox.merge_requested`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from lora_studio.gui.base.widgets import line_chart, refill_adapter_choices

if TYPE_CHECKING:
    from lora_studio.core.evaluate.scale import ScaleSweep

ALL_FILES = "*"  # the data choice "every evaluation file together"


class SweepBox(QWidget):
    """The adapter and scales to try, the loss and KL chart (drawn on the first sweep), the best scale."""

    sweep_requested = Signal()
    apply_requested = Signal()  # run the adapter at the best scale in the session
    merge_requested = Signal()  # tick the adapter alone in the Merge tab at the best scale

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plot: Any = None  # the chart, made on the first sweep
        self.scale_adapter = QComboBox()
        self.scale_data = QComboBox()
        self.scale_data.setToolTip(
            "the data the sweep judges the scale on: the adapter's own validation set by default (a scale that suits "
            "other tasks' data is not the adapter's best)"
        )
        self.scale_values = QLineEdit("0:1.5:0.25")
        self.scale_values.setToolTip("scales to try: 0, 0.5, 1 or a range start:stop:step")
        self.sweep_btn = QPushButton("Sweep")
        self.sweep_btn.setToolTip("evaluate the adapter at each scale on the data (PEFT's set_scale, no merge)")
        self.best_label = QLabel("")
        self.best_label.setWordWrap(True)
        self.apply_scale_btn = QPushButton("Apply to session")
        self.apply_scale_btn.setToolTip("run the adapter at the best scale in Compare and evaluations")
        self.merge_scale_btn = QPushButton("Use in Merge")
        self.merge_scale_btn.setToolTip("tick the adapter alone in the Merge tab at the best scale")
        self.plot_holder = QVBoxLayout()
        self.plot_placeholder = QLabel(
            "Sweep plots the adapter's loss and its KL from the base against its scale (0 is the base, 1 the "
            "adapter as trained), on the data at the left."
        )
        self.plot_placeholder.setWordWrap(True)
        self.plot_placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.plot_placeholder.setStyleSheet("color: palette(mid);")
        self.plot_holder.addWidget(self.plot_placeholder, 1)

        layout = QVBoxLayout(self)
        scale_row = QHBoxLayout()
        scale_row.addWidget(QLabel("Adapter"))
        scale_row.addWidget(self.scale_adapter, 1)
        scale_row.addWidget(QLabel("Scales"))
        scale_row.addWidget(self.scale_values, 1)
        scale_row.addWidget(self.sweep_btn)
        layout.addLayout(scale_row)
        data_row = QHBoxLayout()
        data_row.addWidget(QLabel("On"))
        data_row.addWidget(self.scale_data, 1)
        layout.addLayout(data_row)
        layout.addLayout(self.plot_holder, 1)
        best_row = QHBoxLayout()
        best_row.addWidget(self.best_label, 1)
        best_row.addWidget(self.apply_scale_btn)
        best_row.addWidget(self.merge_scale_btn)
        layout.addLayout(best_row)

        self.sweep_btn.clicked.connect(lambda: self.sweep_requested.emit())
        self.apply_scale_btn.clicked.connect(lambda: self.apply_requested.emit())
        self.merge_scale_btn.clicked.connect(lambda: self.merge_requested.emit())

    def set_adapters(self, names: list[str], *, choose_new: bool = True) -> None:
        """The adapters to choose from: a newly attached one is chosen (``choose_new``), else the choice stays."""
        refill_adapter_choices(self.scale_adapter, names, choose_new=choose_new)

    def clear(self) -> None:
        """No sweep (another base was loaded)."""
        if self.plot is not None:
            self.plot.clear()
        self.best_label.setText("")

    def set_data_choices(self, files: list[Path], own: Path | None) -> None:
        """The sets to sweep on: each evaluation file, and every one together; ``own`` (the adapter's validation
        set, listed first when it is not among the files) is chosen, else the one chosen before, else them all."""
        current = self.scale_data.currentData()
        choices = ([own] if own is not None and own not in files else []) + files
        self.scale_data.blockSignals(True)
        self.scale_data.clear()
        for path in choices:
            label = f"{path.name} (the adapter's validation set)" if path == own else path.name
            self.scale_data.addItem(label, str(path))
            self.scale_data.setItemData(self.scale_data.count() - 1, str(path), Qt.ItemDataRole.ToolTipRole)
        if len(files) > 1:
            self.scale_data.addItem(f"all {len(files)} evaluation files", ALL_FILES)
        pick = str(own) if own is not None else current or ALL_FILES  # no set of its own: every file, as before
        index = self.scale_data.findData(pick) if pick is not None else -1
        self.scale_data.setCurrentIndex(max(index, 0))
        self.scale_data.blockSignals(False)

    def sweep_files(self, files: list[Path]) -> list[Path]:
        """The files the sweep is to run on."""
        chosen = self.scale_data.currentData()
        return files if chosen in (None, ALL_FILES) else [Path(chosen)]

    def show_sweep(self, sweep: ScaleSweep) -> None:
        """Chart the loss, the KL from the base and the base's loss against the scale; mark and say the best."""
        import pyqtgraph as pg

        if self.plot is None:
            self.plot = line_chart("scale", "loss (nats/token)")
            self.plot_placeholder.hide()
            self.plot_holder.addWidget(self.plot, 1)
        plot = self.plot
        plot.clear()
        xs = [p.scale for p in sweep.points]
        plot.plot(
            xs, [p.loss for p in sweep.points], pen=pg.mkPen("#4c78a8", width=2), symbol="o", symbolSize=6, name="loss"
        )
        plot.plot(
            xs,
            [p.kl_from_base for p in sweep.points],
            pen=pg.mkPen("#e45756", width=2),
            symbol="t",
            symbolSize=6,
            name="KL from base",
        )
        plot.plot(
            xs, [sweep.base_loss] * len(xs), pen=pg.mkPen("#777", width=1, style=Qt.PenStyle.DashLine), name="base loss"
        )
        best = sweep.best
        plot.addItem(pg.InfiniteLine(best.scale, angle=90, pen=pg.mkPen("#54a24b", width=1)))
        self.best_label.setText(
            f"{sweep.adapter}: best scale {best.scale:g} — loss {best.loss:.4f} (at 1: "
            f"{loss_at(sweep, 1.0)}; base {sweep.base_loss:.4f}), KL from base {best.kl_from_base:.4f}"
            + (f" — on {', '.join(sweep.data)}" if sweep.data else "")
        )


def loss_at(sweep: ScaleSweep, scale: float) -> str:
    """The sweep's loss at ``scale``, or "not tried"."""
    point = next((p for p in sweep.points if p.scale == scale), None)
    return "not tried" if point is None else f"{point.loss:.4f}"
