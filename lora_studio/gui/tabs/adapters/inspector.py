"""The adapter inspector: an adapter's config and size, its ‖ΔW‖ per layer, and its training loss (loss.csv).

It only draws what a side job read (``core.adapters.inspection.inspect_adapter`` and
``core.adapters.training_log.read_loss_log``); the reading and the arithmetic are the core's.
pyqtgraph is imported when the charts are first built (the window does it while idle, right after
pyqtgraph's preload), never at import time.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QGroupBox, QLabel, QSizePolicy, QVBoxLayout, QWidget

from lora_studio.core.adapters.inspection import AdapterInspection, per_layer_norms
from lora_studio.core.system.memory import format_bytes
from lora_studio.gui.base.widgets import swatch

if TYPE_CHECKING:
    from lora_studio.core.adapters.training_log import TrainingLog

FIELDS = ("name", "rank r", "alpha", "scaling", "init", "targets", "params", "file", "notes")
NOTHING_SELECTED = "select an adapter in the list to inspect it"
TRAIN_COLOR, VALIDATION_COLOR = "#4c78a8", "#e45756"
MAX_LABELLED_BARS = 12  # more labels are unreadable, and each one costs text layout in every axis repaint


class AdapterInspector(QGroupBox):
    """Fields, the ‖ΔW‖-per-layer bar chart and the loss chart of one adapter."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Inspector", parent)
        self.inspection: AdapterInspection | None = None
        form = QFormLayout()
        self.fields: dict[str, QLabel] = {}
        for key in FIELDS:
            label = QLabel("–")
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.fields[key] = label
            form.addRow(key, label)
        self.chart_host = QVBoxLayout()
        self.chart_title = QLabel("‖ΔW‖ per layer (Frobenius norm of scaling·B·A)")
        self.chart_title.setStyleSheet("color: palette(mid);")
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.chart_title)
        layout.addLayout(self.chart_host, 1)
        self.chart: Any = None  # a pyqtgraph PlotWidget once built
        self.chart_values: tuple[list[str], list[float]] | None = None  # (labels, values) as drawn
        # training loss from loss.csv beside the adapter; hidden when there is none
        self.loss_box = QWidget()
        loss_layout = QVBoxLayout(self.loss_box)
        loss_layout.setContentsMargins(0, 0, 0, 0)
        self.loss_title = QLabel("training loss (loss.csv)")
        self.loss_title.setStyleSheet("color: palette(mid);")
        self.loss_title.setTextFormat(Qt.TextFormat.RichText)  # the curves' swatches
        self.loss_title.setWordWrap(True)
        loss_layout.addWidget(self.loss_title)
        self.loss_host = QVBoxLayout()
        loss_layout.addLayout(self.loss_host, 1)
        self.loss_box.hide()
        layout.addWidget(self.loss_box, 1)
        self.loss_chart: Any = None
        self.loss_values: tuple[list, list, list, list] | None = None  # (train steps, values, val steps, values)
        self.fields["name"].setText(NOTHING_SELECTED)

    def clear(self, why: str = NOTHING_SELECTED) -> None:
        """Show no adapter; ``why`` in the name field (nothing selected, or the base selected)."""
        self.inspection = None
        self.chart_values = None
        self.show_loss(None)
        for label in self.fields.values():
            label.setText("–")
            label.setToolTip("")
        self.fields["name"].setText(why)
        if self.chart is not None:
            plot = self.chart.getPlotItem()
            plot.clear()
            plot.getAxis("bottom").setTicks(None)  # no layer names left from the adapter shown before

    def show_error(self, message: str) -> None:
        self.fields["notes"].setText(message)

    def show_inspection(self, insp: AdapterInspection) -> None:
        self.inspection = insp
        f = self.fields
        flavour = f"{', DoRA' if insp.use_dora else ''}{', rsLoRA' if insp.use_rslora else ''}"
        f["name"].setText(f"<b>{insp.name}</b> ({insp.peft_type}{flavour})")
        f["rank r"].setText(str(insp.r))
        f["alpha"].setText(f"{insp.lora_alpha:g}")
        f["scaling"].setText(f"{insp.scaling:g}")
        f["init"].setText(insp.init_summary or insp.init_lora_weights)  # "OLoRA, converted"
        f["init"].setToolTip(f"init_lora_weights: {insp.init_lora_weights}")
        targets = insp.target_modules
        f["targets"].setText(", ".join(sorted(targets)) if isinstance(targets, (list, tuple, set)) else str(targets))
        pct = f" ({insp.percent_of_base:.3f}% of base)" if insp.percent_of_base is not None else ""
        f["params"].setText(f"{insp.params:,}{pct} in {len(insp.modules)} modules")
        f["file"].setText(f"{insp.weights_file}, {format_bytes(insp.weights_bytes)}")
        f["notes"].setText("; ".join(insp.warnings) or "–")
        self._draw_norms(insp)

    def build_charts(self) -> None:
        """Create the ‖ΔW‖ and loss charts (once; ~50-100 ms of pyqtgraph set-up on the GUI thread).

        The window calls this while idle, right after pyqtgraph's import, so that selecting the first
        adapter only fills them in; otherwise it happens on first use.
        """
        import pyqtgraph as pg  # lazy: ~1 s to import, preloaded after the window shows

        if self.chart is None:
            self.chart = _static_plot(pg, 120, "layer", "‖ΔW‖", x_grid=False)
            self.chart_host.addWidget(self.chart, 1)
        if self.loss_chart is None:
            self.loss_chart = _static_plot(pg, 110, "step", "loss", x_grid=True)
            self.loss_host.addWidget(self.loss_chart, 1)

    def _draw_norms(self, insp: AdapterInspection) -> None:
        import pyqtgraph as pg

        self.build_charts()
        labels, values = per_layer_norms(insp.modules)
        plot = self.chart.getPlotItem()
        plot.clear()
        xs = list(range(len(values)))
        plot.addItem(pg.BarGraphItem(x=xs, height=values, width=0.7, brush="#4c78a8"))
        # at most ~12 labelled bars; the others are minor ticks without text
        step = max(1, -(-len(xs) // MAX_LABELLED_BARS))
        major = [(x, label) for x, label in zip(xs, labels, strict=True) if x % step == 0]
        plot.getAxis("bottom").setTicks([major, [(x, "") for x in xs if x % step]])
        if xs:
            plot.setXRange(-0.6, len(xs) - 0.4, padding=0)
            plot.setYRange(0, max(values) * 1.1 or 1, padding=0)
        self.chart_values = (labels, values)

    def show_loss(self, log: TrainingLog | str | None) -> None:
        """Train/validation loss from the adapter's loss.csv; its problem as the title; hidden when it has none."""
        if log is None:
            self.loss_box.hide()
            self.loss_values = None
            return
        self.loss_box.show()
        if isinstance(log, str):
            self.loss_title.setText(f"training loss: {html.escape(log)}")
            if self.loss_chart is not None:
                self.loss_chart.hide()
            self.loss_values = None
            return
        import pyqtgraph as pg

        self.build_charts()
        self.loss_chart.show()
        plot = self.loss_chart.getPlotItem()
        plot.clear()
        train, val = log.train, log.val
        if len(train):
            plot.plot(list(train.steps), list(train.values), pen=pg.mkPen(TRAIN_COLOR, width=2), name="train")
        if len(val):
            plot.plot(
                list(val.steps),
                list(val.values),
                pen=pg.mkPen(VALIDATION_COLOR, width=2),
                name="validation",
                symbol="o",
                symbolSize=5,
                symbolBrush=VALIDATION_COLOR,
                symbolPen=None,
            )
        parts = [  # each with its line's swatch: the title is the chart's legend, which covers no line
            f"{swatch(TRAIN_COLOR)}&nbsp;train {train.last:.3f} (best {train.best:.3f})" if len(train) else "",
            f"{swatch(VALIDATION_COLOR)}&nbsp;validation {val.last:.3f} (best {val.best:.3f})" if len(val) else "",
        ]
        title = "training loss (loss.csv): " + ", ".join(p for p in parts if p)
        if log.warnings:
            title += " — " + html.escape("; ".join(log.warnings))
        self.loss_title.setText(title)
        self.loss_values = (list(train.steps), list(train.values), list(val.steps), list(val.values))


def _static_plot(pg: Any, min_height: int, bottom: str, left: str, x_grid: bool) -> Any:
    """A white pyqtgraph plot without mouse interaction, menu or buttons (the inspector's charts)."""
    plot = pg.PlotWidget()
    plot.setMinimumHeight(min_height)
    # no preferred height (pyqtgraph asks for 480 px): the inspector's wrapped fields make its scroll area size it by
    # height-for-width, which summed both charts' 480 and put the ‖ΔW‖ chart's axis below the fold at 720 px
    plot.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)
    plot.setBackground("w")
    plot.showGrid(x=x_grid, y=True, alpha=0.25)
    plot.setMouseEnabled(x=False, y=False)
    plot.hideButtons()
    plot.getPlotItem().setMenuEnabled(False)
    plot.setLabel("bottom", bottom)
    plot.setLabel("left", left)
    return plot
