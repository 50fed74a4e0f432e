"""The live memory monitor: readings a few times a second from a sampling thread, a rolling chart, event markers.

The sampling (psutil, NVML, torch) happens on the core's SamplingThread, never on
the GUI thread; samples arrive here through a queued signal. pyqtgraph is imported
when the chart is first built (after the window is shown) because importing it
costs about a second of startup.
"""

from __future__ import annotations

from collections import deque

from PySide6.QtCore import QObject, Qt, Signal, Slot
from PySide6.QtWidgets import QGraphicsItem, QGridLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from lora_studio.core.system.memory import GiB, MemorySample, MemorySampler, Reclaimed, SamplingThread, format_bytes

HISTORY_S = 120.0  # the chart shows the last two minutes
SAMPLE_INTERVAL_S = 0.25
MAX_MARKERS = 30
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= value (0.1 at least)."""
    import math

    value = max(value, 0.1)
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value - 1e-12:
            return step * power
    return 10 * power


class MemoryMonitor(QObject):
    """Owns the sampler and its thread; re-emits each sample on the GUI thread."""

    sampled = Signal(object)  # MemorySample
    _from_thread = Signal(object)

    def __init__(
        self, sampler: MemorySampler | None = None, interval_s: float = SAMPLE_INTERVAL_S, parent=None
    ) -> None:
        super().__init__(parent)
        self.sampler = sampler or MemorySampler()
        self.interval_s = interval_s
        self._thread: SamplingThread | None = None
        self._closed = False
        self._from_thread.connect(self.sampled, Qt.ConnectionType.QueuedConnection)

    def start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = SamplingThread(self.sampler, self._from_thread.emit, self.interval_s).start()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def close(self) -> None:
        self._closed = True
        self.stop()
        self.sampler.close()


class MemoryPanel(QWidget):
    def __init__(self, monitor: MemoryMonitor, parent=None) -> None:
        super().__init__(parent)
        self.monitor = monitor
        self.samples: deque[MemorySample] = deque(maxlen=int(HISTORY_S / monitor.interval_s) + 8)
        self.markers: deque[tuple[float, str]] = deque(maxlen=MAX_MARKERS)
        self.ram_label = QLabel("Reading memory…")
        self.ram_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.gpu_box = QGridLayout()
        self.gpu_labels: list[QLabel] = []
        self.no_gpu_label = QLabel("")
        self.no_gpu_label.setStyleSheet("color: palette(mid);")
        self.release_label = QLabel("")
        self.release_label.setWordWrap(True)
        self.release_label.hide()
        self.chart_host = QVBoxLayout()
        self.placeholder = QLabel("chart starting…")
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.chart_host.addWidget(self.placeholder)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.ram_label)
        layout.addLayout(self.gpu_box)
        layout.addWidget(self.no_gpu_label)
        layout.addWidget(self.release_label)
        layout.addLayout(self.chart_host, 1)
        self.plot = None
        self._curves: dict[str, object] = {}
        self._marker_items: list = []
        if not monitor.sampler.has_gpus:
            self.no_gpu_label.setText(monitor.sampler.gpu_status or "no NVIDIA GPU found")
        else:
            self.no_gpu_label.hide()
        monitor.sampled.connect(self.on_sample)

    # -- chart --------------------------------------------------------------------------------------------------------
    def build_chart(self) -> None:
        """Create the pyqtgraph chart (deferred: importing pyqtgraph is slow)."""
        if self.plot is not None:
            return
        import pyqtgraph as pg

        pg.setConfigOptions(antialias=False, background="w", foreground="#333")
        plot = pg.PlotWidget()
        plot.setMinimumHeight(140)
        plot.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        # Horizontal grid lines only: pyqtgraph draws a grid as part of its axis, so an x grid would make the
        # bottom axis repaint with every sample too. The y range is set by _redraw in steps (not auto-ranged
        # each sample), so the left axis is re-laid out only when the range grows or shrinks a step.
        plot.showGrid(x=False, y=True, alpha=0.25)
        plot.enableAutoRange(axis="y", enable=False)
        plot.setLabel("left", "GiB")
        plot.setLabel("bottom", "seconds ago")
        plot.setXRange(-HISTORY_S, 0, padding=0.01)
        plot.setMouseEnabled(x=False, y=False)
        plot.hideButtons()
        plot.getPlotItem().setMenuEnabled(False)
        plot.addLegend(offset=(8, 4), labelTextSize="8pt", colCount=4)
        # Axes and legend change rarely (a y step, a new curve): Qt keeps them as pixmaps, so a repaint for a
        # new sample does not call their Python paint() - each such call waits for the GIL beside a busy worker.
        for item in (plot.getAxis("left"), plot.getAxis("bottom"), plot.getPlotItem().legend):
            item.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
        self._pg = pg
        self._y_top = None
        self.plot = plot
        self.placeholder.hide()
        self.chart_host.addWidget(plot, 1)
        self._redraw()

    def _curve(self, key: str, label: str, style=Qt.PenStyle.SolidLine):
        curve = self._curves.get(key)
        if curve is None:
            color = COLORS[len(self._curves) % len(COLORS)]
            curve = self.plot.plot([], [], name=label, pen=self._pg.mkPen(color, width=2, style=style))
            self._curves[key] = curve
        return curve

    def curve_names(self) -> list[str]:
        return list(self._curves)

    # -- samples ------------------------------------------------------------------------------------------------------
    @Slot(object)
    def on_sample(self, sample: MemorySample) -> None:
        self.samples.append(sample)
        ram_pct = 100.0 * sample.ram_used_bytes / sample.ram_total_bytes if sample.ram_total_bytes else 0
        self.ram_label.setText(
            f"<b>This process</b> {format_bytes(sample.rss_bytes)} &nbsp;·&nbsp; "
            f"<b>System RAM</b> {format_bytes(sample.ram_used_bytes)} / {format_bytes(sample.ram_total_bytes)} "
            f"({ram_pct:.0f}%)"
        )
        self._update_gpu_labels(sample)
        self._redraw()

    def _update_gpu_labels(self, sample: MemorySample) -> None:
        torch_by_dev = {t.device: t for t in sample.torch_cuda}
        while len(self.gpu_labels) < len(sample.gpus):
            label = QLabel()
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.gpu_box.addWidget(label, len(self.gpu_labels), 0)
            self.gpu_labels.append(label)
        for label, gpu in zip(self.gpu_labels, sample.gpus, strict=False):
            util = f" · {gpu.utilization_percent}% busy" if gpu.utilization_percent is not None else ""
            text = f"<b>GPU {gpu.index}</b> {gpu.name}: {format_bytes(gpu.used_bytes)} / {format_bytes(gpu.total_bytes)}{util}"
            t = torch_by_dev.get(f"cuda:{gpu.index}")
            if t is not None:
                text += (
                    f" · torch {format_bytes(t.allocated_bytes)} allocated, {format_bytes(t.reserved_bytes)} reserved"
                )
            label.setText(text)
        if not sample.gpus and self.monitor.sampler.gpu_status:
            self.no_gpu_label.setText(self.monitor.sampler.gpu_status)
            self.no_gpu_label.show()

    def _redraw(self) -> None:
        if self.plot is None or not self.samples:
            return
        now = self.samples[-1].time
        xs = [s.time - now for s in self.samples]
        self._curve("rss", "this process").setData(xs, [s.rss_bytes / GiB for s in self.samples])
        self._curve("ram", "system RAM", Qt.DashLine).setData(xs, [s.ram_used_bytes / GiB for s in self.samples])
        last = self.samples[-1]
        for gpu in last.gpus:
            key = f"gpu{gpu.index}"
            ys = []
            for s in self.samples:
                match = next((g for g in s.gpus if g.index == gpu.index), None)
                ys.append(match.used_bytes / GiB if match else float("nan"))
            self._curve(key, f"GPU {gpu.index}").setData(xs, ys)
        for t in last.torch_cuda:
            ys = []
            for s in self.samples:
                match = next((r for r in s.torch_cuda if r.device == t.device), None)
                ys.append(match.allocated_bytes / GiB if match else float("nan"))
            self._curve(f"torch-{t.device}", f"torch {t.device}", Qt.DotLine).setData(xs, ys)
        self._set_y_range(
            max(max(s.rss_bytes, s.ram_used_bytes, *(g.used_bytes for g in s.gpus)) for s in self.samples) / GiB
        )
        self._draw_markers(now)

    def _set_y_range(self, peak_gib: float) -> None:
        """0 .. the next 1-2-5 step above the peak (with headroom); changed only when that step changes."""
        top = nice_ceiling(peak_gib * 1.08)
        if top != self._y_top:
            self._y_top = top
            self.plot.setYRange(0, top, padding=0)

    def _draw_markers(self, now: float) -> None:
        pg = self._pg
        while len(self._marker_items) < len(self.markers):
            # vertical text along the line, staggered so neighbouring markers do not overprint
            position = (0.95, 0.7, 0.45)[len(self._marker_items) % 3]
            line = pg.InfiniteLine(
                angle=90,
                movable=False,
                pen=pg.mkPen("#888", width=1, style=Qt.PenStyle.DashLine),
                label="",
                labelOpts={
                    "position": position,
                    "color": "#333",
                    "rotateAxis": (1, 0),
                    "anchors": [(1, 1), (1, 1)],
                    "fill": (255, 255, 255, 200),
                },
            )
            line.label.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)  # the text only moves with time
            self.plot.addItem(line)
            self._marker_items.append(line)
        for item, (t, text) in zip(self._marker_items, self.markers, strict=False):
            item.setPos(t - now)
            if item.label.format != text:
                item.label.setFormat(text)
            item.setVisible(t - now > -HISTORY_S)

    # -- events -------------------------------------------------------------------------------------------------------
    def mark(self, text: str) -> None:
        """An event marker on the chart ('loaded base', 'attached alpha', 'merged')."""
        import time

        if len(self.markers) == self.markers.maxlen and self._marker_items:
            # the oldest marker falls off: reuse its line for the newest
            self._marker_items.append(self._marker_items.pop(0))
        self.markers.append((time.monotonic(), text))
        self._redraw()

    def show_release(self, reclaimed: Reclaimed) -> None:
        self.release_label.setText(reclaimed.message())
        self.release_label.setStyleSheet(
            "color: #b35900; font-weight: bold;" if reclaimed.leaked else "color: #2a7a2a;"
        )
        self.release_label.show()
