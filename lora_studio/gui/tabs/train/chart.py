"""The Train tab's live chart: the loss curves of a run, its stats line and the overfitting warning.

A run's metrics arrive on the worker thread (:meth:`TrainChart.queue`); a 5 Hz timer draws them on the GUI
thread: the training and validation loss (and the full fine-tuning baseline's validation loss), and a line with
the step, the losses, learning rate, tokens/s, elapsed time and ETA.
"""

from __future__ import annotations

import threading
from typing import Any

from PySide6.QtCore import QObject, Qt, QTimer
from PySide6.QtWidgets import QLabel, QVBoxLayout

from lora_studio.core.train import TrainMetrics
from lora_studio.gui.base.widgets import ElidedLabel, line_chart

DRAW_INTERVAL_MS = 200
BASELINE_LABEL = "full fine-tuning (val.)"


def format_duration(seconds: float | None) -> str:
    """A duration in words, ``42 s``, ``15 min 49 s``, ``2 h 05 min`` (``15:49`` reads like a time of day);
    "…" when unknown."""
    if seconds is None:
        return "…"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class TrainChart(QObject):
    """The chart (made on first use, in :attr:`holder`), :attr:`stats_label` and :attr:`warning_label`."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.holder = QVBoxLayout()  # the panel places it; the chart goes in when first needed
        self.stats_label = ElidedLabel("")
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet("color: #b35c00;")
        self.warning_label.hide()
        self.series: dict[str, tuple[list[float], list[float]]] = {}  # "lora:train" -> (steps, losses)
        self.plot: Any = None
        self._curves: dict[str, Any] = {}
        self._queue: list[TrainMetrics] = []
        self._lock = threading.Lock()
        self._x_span = 0  # the last step the x axis was set to reach
        self._last_train_point: TrainMetrics | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(DRAW_INTERVAL_MS)
        self._timer.timeout.connect(self.draw)

    def queue(self, point: TrainMetrics) -> None:  # the worker thread
        with self._lock:
            self._queue.append(point)

    def begin_run(self, fresh: bool, baseline: bool) -> None:
        """A run starts: a ``fresh`` one (not a resume) clears the curves; the legend lists a ``baseline`` run's."""
        if fresh:
            self.series.clear()
            for curve in self._curves.values():
                curve.setData([], [])
            self._last_train_point = None
            self._x_span = 0
            if self.plot is not None:  # the last run's axes go with its curves
                self.plot.enableAutoRange()
        self._list_baseline(baseline)
        self.warning_label.hide()
        self.stats_label.setText("")  # the last run's "step 20/20" is not this one's

    def start(self) -> None:
        """Draw what arrives, five times a second."""
        self._timer.start()

    def stop(self) -> None:
        """The run ended: the last points are drawn, and the line says how long it took, not what is left."""
        self._timer.stop()
        self.draw()
        if self._last_train_point is not None:
            self._show_stats(self._last_train_point, ended=True)

    def ensure_plot(self) -> Any:
        """The chart, made on first use (the empty chart, axes and legend, before the first point)."""
        if self.plot is None:
            import pyqtgraph as pg

            plot = line_chart("step", "loss")
            styles = {
                "lora:train": dict(pen=pg.mkPen("#4c78a8", width=2), name="training loss"),
                # the symbols' pen and brush made once: given as colours (or left to pyqtgraph's default tuples),
                # each draw converts them again through numpy, which keeps a reference to None per conversion
                "lora:val": dict(
                    pen=pg.mkPen("#e45756", width=2),
                    symbol="o",
                    symbolSize=5,
                    symbolPen=pg.mkPen("#e45756"),
                    symbolBrush=pg.mkBrush("#e45756"),
                    name="validation loss",
                ),
                "full:val": dict(pen=pg.mkPen("#777", width=2, style=Qt.PenStyle.DashLine), name=BASELINE_LABEL),
            }
            self._curves = {key: plot.plot([], [], **style) for key, style in styles.items()}
            # steps are whole numbers: no "(x0.001)" scale on the axis while the run has one point
            plot.getPlotItem().getAxis("bottom").enableAutoSIPrefix(False)
            self.holder.addWidget(plot)
            self.plot = plot
            self._list_baseline(False)
        return self.plot

    def _list_baseline(self, shown: bool) -> None:
        """The baseline's curve in the legend only for a run that has one."""
        legend = self.plot.getPlotItem().legend if self.plot is not None else None
        curve = self._curves.get("full:val")
        if legend is None or curve is None:
            return
        listed = legend.getLabel(curve) is not None
        if shown and not listed:
            legend.addItem(curve, BASELINE_LABEL)
        elif listed and not shown:
            legend.removeItem(curve)

    def _span_run(self, total_steps: int) -> None:
        """The x axis from step 0 to the run's last step, from its first point (the curves grow into it)."""
        if self.plot is not None and total_steps > 0 and self._x_span != total_steps:
            self._x_span = total_steps
            self.plot.setXRange(0, total_steps, padding=0.02)

    def draw(self) -> None:
        """Draw the points queued since the last tick (the timer's slot)."""
        with self._lock:
            points, self._queue = self._queue, []
        if not points:
            return
        self.ensure_plot()
        last = self._last_train_point
        for p in points:
            for kind, value in (("train", p.train_loss), ("val", p.val_loss)):
                if value is not None:
                    xs, ys = self.series.setdefault(f"{p.run}:{kind}", ([], []))
                    xs.append(p.step)
                    ys.append(value)
            if p.warning:
                self.warning_label.setText("⚠ " + p.warning)
                self.warning_label.show()
            if p.train_loss is not None:
                last = p
            self._span_run(p.total_steps)
        self._last_train_point = last  # an evaluation that arrives after the last step still updates the line
        for key, curve in self._curves.items():
            xs, ys = self.series.get(key, ([], []))
            curve.setData(xs, ys)
        if last is not None:
            self._show_stats(last)

    def _show_stats(self, last: TrainMetrics, *, ended: bool = False) -> None:
        val = self.series.get(f"{last.run}:val", ([], []))[1]
        what = "baseline " if last.run == "full" else ""
        # the time left first: a narrow pane elides the end of the line, and the rates matter least
        left = f"{format_duration(last.eta_s)} left" if last.eta_s is not None else "time left: after a few steps"
        timing = (
            f"ended after {format_duration(last.elapsed_s)}"
            if ended
            else f"{left} ({format_duration(last.elapsed_s)} elapsed)"
        )
        self.stats_label.setText(
            f"{what}step {last.step}/{last.total_steps} · {timing}"
            + f" · train {last.train_loss:.4f}"
            + (f" · val {val[-1]:.4f}" if val else "")
            + (f" · lr {last.learning_rate:.2e}" if last.learning_rate is not None else "")
            + (f" · {last.tokens_per_s:,.0f} tokens/s" if last.tokens_per_s else "")
        )
