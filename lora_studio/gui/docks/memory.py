"""The live memory monitor: readings four times a second from a sampling thread, a rolling chart, event markers.

The sampling (psutil, NVML, torch) happens on the core's SamplingThread, never on
the GUI thread; samples arrive here through a queued signal. pyqtgraph is imported
when the chart is first built (after the window is shown) because importing it
costs about a second of startup.

The readings say what each number is: the process's resident memory split into its own (anonymous) memory and
mapped-file pages (weights loaded by mmap count in RSS, but the system counts clean file pages as page cache, so
RSS can exceed the system's "in use"), and system RAM in use (total - available). The lines above the chart
double as its legend. Event markers closer than a few pixels merge into one "N events" marker; every marker's
full text is in its tooltip.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal, Slot
from PySide6.QtWidgets import QGraphicsItem, QGridLayout, QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from lora_studio.core.system.memory import GiB, MemorySample, MemorySampler, Reclaimed, SamplingThread, format_bytes
from lora_studio.gui.base.widgets import ElidedLabel, swatch

HISTORY_S = 120.0  # the chart shows the last two minutes
SAMPLE_INTERVAL_S = 0.25
# The readings and the chart are redrawn once a second with every sample since (a short peak still shows): a redraw
# costs the GUI thread 10-25 ms on a 2-core machine, and four a second added to every other event's wait.
REDRAW_INTERVAL_S = 1.0
MAX_MARKERS = 30
MARKER_MIN_GAP_PX = 18  # markers closer than this (about a label's line height) merge into one
REPEAT_MARKER_S = 1.0  # the same text again within this long is one event (a panel and the window both said it)
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# fixed colours per curve, so the readings above the chart can be its legend
CURVE_COLORS = {"rss": "#1f77b4", "anon": "#1f77b4", "ram": "#ff7f0e", "workers": "#7f7f7f"}
GPU_COLORS = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

PROCESS_TIP = (
    "This process's resident memory (RSS), split in two:\n"
    "• its own: heap and tensors it created (anonymous memory, RssAnon)\n"
    "• mapped files: pages of files it maps - weights loaded by mmap from .safetensors, libraries (RssFile)\n"
    "Mapped file pages count in RSS, but the system counts clean ones as page cache (reclaimable), so this can be\n"
    "larger than 'System RAM in use'. Solid line: RSS; dotted: its own memory.\n"
    "Worker process (grey): a training run, which runs in a process of its own beside the window."
)
SYSTEM_TIP = (
    "System RAM in use by every process: total - available (the kernel's MemAvailable).\n"
    "Page cache, which includes the weight files this process maps, counts as available, not as in use."
)

MPS_TIP = (
    "torch's allocations on Apple silicon's GPU (torch.mps.current_allocated_memory) and all the Metal driver holds "
    "for this process (torch.mps.driver_allocated_memory); both come out of the RAM the CPU uses"
)
GPU_TIP = (
    "GPU memory in use by every process on this GPU (NVML), and torch's allocator in this process:\n"
    "allocated = live tensors (dotted line); reserved = what torch keeps cached for reuse (also counts in use)."
)


@dataclass(frozen=True)
class MarkerGroup:
    """One drawn marker: the events that fall within a few pixels of each other."""

    time: float  # time.monotonic() of its first event (where its line is drawn)
    events: tuple[tuple[float, str], ...]  # (time.monotonic(), text), oldest first

    @property
    def label(self) -> str:
        return self.events[0][1] if len(self.events) == 1 else f"{len(self.events)} events"


def group_markers(markers: Sequence[tuple[float, str]], min_gap_s: float) -> list[MarkerGroup]:
    """Markers in time order, merged so that no two drawn lines are closer than ``min_gap_s``.

    A group starts at its first event and takes every later one within ``min_gap_s`` of that start, so the
    next group's line is at least ``min_gap_s`` away.
    """
    groups: list[list[tuple[float, str]]] = []
    for t, text in sorted(markers, key=lambda m: m[0]):
        if groups and t - groups[-1][0][0] < min_gap_s:
            groups[-1].append((t, text))
        else:
            groups.append([(t, text)])
    return [MarkerGroup(g[0][0], tuple(g)) for g in groups]


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
        self, sampler: MemorySampler | None = None, interval_s: float = SAMPLE_INTERVAL_S, parent: QObject | None = None
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
    def __init__(self, monitor: MemoryMonitor, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.monitor = monitor
        self.samples: deque[MemorySample] = deque(maxlen=int(HISTORY_S / monitor.interval_s) + 8)
        self.markers: deque[tuple[float, str]] = deque(maxlen=MAX_MARKERS)
        self._marker_clock: dict[float, str] = {}  # marker time -> wall-clock "HH:MM:SS", for the tooltips
        # the process line: RSS = its own + mapped files; the system line: RAM in use (page cache not counted)
        self.ram_label = QLabel("Reading memory…")
        self.ram_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.ram_label.setToolTip(PROCESS_TIP)
        self.system_label = QLabel("")
        self.system_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.system_label.setToolTip(SYSTEM_TIP)
        # a training run's worker, on the system line (room there; the process line is full at 1280 px)
        self.worker_label = QLabel("")
        self.worker_label.setToolTip(PROCESS_TIP)
        self.worker_label.hide()
        # Readings change every second: their text must never set the dock's width. A QLabel asks for its whole
        # text as its minimum; a longer reading then widened the dock and re-laid out the window (~50 ms).
        for label in (self.ram_label, self.system_label, self.worker_label):
            label.setMinimumWidth(1)
        self.gpu_box = QGridLayout()
        self.gpu_labels: list[QLabel] = []
        self.mps_label: QLabel | None = None
        self.no_gpu_label = ElidedLabel("")  # beside the system line: one line, the full reason in its tooltip
        self.no_gpu_label.setStyleSheet("color: palette(mid);")
        self.no_gpu_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        # one elided line whose place is kept while hidden: a release message never takes the chart's height
        self.release_label = ElidedLabel("")
        policy = self.release_label.sizePolicy()
        policy.setRetainSizeWhenHidden(True)
        self.release_label.setSizePolicy(policy)
        self.release_label.hide()
        self.chart_host = QVBoxLayout()
        self.placeholder = QLabel("chart starting…")
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.chart_host.addWidget(self.placeholder)
        system_row = QHBoxLayout()
        system_row.addWidget(self.system_label)
        system_row.addWidget(self.worker_label)
        system_row.addWidget(self.no_gpu_label, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.setSpacing(2)
        layout.addWidget(self.ram_label)
        layout.addLayout(system_row)
        layout.addLayout(self.gpu_box)
        layout.addWidget(self.release_label)
        layout.addLayout(self.chart_host, 1)
        self.plot: Any = None  # a pyqtgraph PlotWidget once built
        self._y_top: float | None = None
        self._curves: dict[str, object] = {}
        self._marker_items: list = []
        self.groups: list[MarkerGroup] = []  # the markers as drawn (merged when close)
        self._markers_pending = False  # events marked since the chart was last drawn
        self._drawn_at = float("-inf")  # the time of the last sample drawn
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
        plot.setMinimumHeight(110)
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
        # No legend inside the plot (it hid the newest markers): the readings above the chart carry the swatches.
        # Axes change rarely (a y step): Qt keeps them as pixmaps, so a repaint for a new sample does not call
        # their Python paint() - each such call waits for the GIL beside a busy worker.
        for item in (plot.getAxis("left"), plot.getAxis("bottom")):
            item.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
        self._pg = pg
        self.plot = plot
        self.placeholder.hide()
        self.chart_host.addWidget(plot, 1)
        # Every marker line the chart can show, made now and hidden (~1 ms each): the chart's items are then a fixed
        # set from the start, not a pool that grows as more events share the chart.
        self._marker_items = [self._new_marker_line() for _ in range(MAX_MARKERS)]
        self._redraw()

    def _curve(self, key: str, label: str, style: Qt.PenStyle = Qt.PenStyle.SolidLine) -> Any:
        curve = self._curves.get(key)
        if curve is None:
            color = curve_color(key)
            curve = self.plot.plot([], [], name=label, pen=self._pg.mkPen(color, width=2, style=style))
            self._curves[key] = curve
        return curve

    def curve_names(self) -> list[str]:
        return list(self._curves)

    # -- samples ------------------------------------------------------------------------------------------------------
    @Slot(object)
    def on_sample(self, sample: MemorySample) -> None:
        self.samples.append(sample)
        with_worker = bool(sample.workers_rss_bytes)
        due = sample.time - self._drawn_at >= REDRAW_INTERVAL_S * 0.95  # a sample a little early still counts
        if not due and with_worker != self.worker_label.isHidden():  # a worker that came or went is shown at once
            return
        self._drawn_at = sample.time
        self.ram_label.setText(process_text(sample))
        self.system_label.setText(system_text(sample))
        self.worker_label.setText(worker_text(sample))
        self.worker_label.setVisible(with_worker)
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
            used = f"{format_bytes(gpu.used_bytes)} / {format_bytes(gpu.total_bytes)}"
            text = f"{swatch(curve_color(f'gpu{gpu.index}'))} <b>GPU {gpu.index}</b> {gpu.name}: {used}{util}"
            t = torch_by_dev.get(f"cuda:{gpu.index}")
            if t is not None:
                text += (
                    f" · {swatch(curve_color(f'gpu{gpu.index}'), 'dot')} torch {format_bytes(t.allocated_bytes)}"
                    f" allocated, {format_bytes(t.reserved_bytes)} reserved"
                )
            label.setText(text)
            label.setToolTip(GPU_TIP)
        mps = torch_by_dev.get("mps")
        if mps is not None:  # Apple silicon: its memory is the RAM above, so a line of its own and no curve
            if self.mps_label is None:
                self.mps_label = QLabel()
                self.mps_label.setToolTip(MPS_TIP)
                self.gpu_box.addWidget(self.mps_label, len(self.gpu_labels), 0)
            self.mps_label.setText(
                f"<b>Apple GPU (mps)</b>: torch {format_bytes(mps.allocated_bytes)} allocated, the Metal driver "
                f"{format_bytes(mps.reserved_bytes)} (unified memory: part of the RAM above)"
            )
        if not sample.gpus and self.monitor.sampler.gpu_status and mps is None:
            self.no_gpu_label.setText(self.monitor.sampler.gpu_status)
            self.no_gpu_label.show()

    def _redraw(self) -> None:
        if self.plot is None or not self.samples:
            return
        now = self.samples[-1].time
        xs = [s.time - now for s in self.samples]
        self._curve("rss", "this process").setData(xs, [s.rss_bytes / GiB for s in self.samples])
        if self.samples[-1].has_rss_split:
            self._curve("anon", "its own", Qt.PenStyle.DotLine).setData(
                xs, [s.rss_anon_bytes / GiB for s in self.samples]
            )
        if any(s.workers_rss_bytes for s in self.samples):
            self._curve("workers", "worker process").setData(xs, [s.workers_rss_bytes / GiB for s in self.samples])
        self._curve("ram", "system RAM", Qt.PenStyle.DashLine).setData(
            xs, [s.ram_used_bytes / GiB for s in self.samples]
        )
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
                reading = next((r for r in s.torch_cuda if r.device == t.device), None)
                ys.append(reading.allocated_bytes / GiB if reading else float("nan"))
            self._curve(f"torch-{t.device}", f"torch {t.device}", Qt.PenStyle.DotLine).setData(xs, ys)
        self._set_y_range(
            max(
                max(s.rss_bytes, s.workers_rss_bytes, s.ram_used_bytes, *(g.used_bytes for g in s.gpus))
                for s in self.samples
            )
            / GiB
        )
        self._draw_markers(now)
        self._markers_pending = False

    def _set_y_range(self, peak_gib: float) -> None:
        """0 .. the next 1-2-5 step above the peak (with headroom); changed only when that step changes."""
        top = nice_ceiling(peak_gib * 1.08)
        if top != self._y_top:
            self._y_top = top
            self.plot.setYRange(0, top, padding=0)

    def _marker_gap_s(self) -> float:
        """How many seconds MARKER_MIN_GAP_PX is on the chart now."""
        width = self.plot.getPlotItem().getViewBox().width() if self.plot is not None else 0
        return MARKER_MIN_GAP_PX * HISTORY_S * 1.02 / (width if width > 50 else 500)

    def _new_marker_line(self) -> Any:
        pg = self._pg
        # vertical text along the line, from the bottom of the chart up (the curves' legend is above the chart)
        line = pg.InfiniteLine(
            angle=90,
            movable=False,
            pen=pg.mkPen("#888", width=1, style=Qt.PenStyle.DashLine),
            label="",
            labelOpts={
                "position": 0.06,  # clear of the bottom axis, which covered the first letter
                "color": "#333",
                "rotateAxis": (1, 0),
                "anchors": [(0, 1), (0, 1)],
                "fill": (255, 255, 255, 200),
            },
        )
        line.label.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)  # the text only moves with time
        line.shown = ("", "")  # (label, tooltip) it shows: set again only when they change
        line.setVisible(False)  # shown when a marker group takes it
        self.plot.addItem(line)
        return line

    def _draw_markers(self, now: float) -> None:
        from PySide6.QtGui import QFontMetrics

        visible = [(t, text) for t, text in self.markers if t - now > -HISTORY_S]
        self.groups = group_markers(visible, self._marker_gap_s())  # at most MAX_MARKERS, one line each
        room = max(40, int(self.plot.getPlotItem().getViewBox().height() * 0.9) - 8)  # the label's length, in pixels
        for item, group in zip(self._marker_items, self.groups, strict=False):
            item.setPos(group.time - now)
            if not item.isVisible():
                # Shown first: pyqtgraph's label skips new text and the view's changes while its line is hidden.
                item.setVisible(True)
                item.viewTransformChanged()
                item.label.viewTransformChanged()
            tip = "\n".join(f"{self._marker_clock.get(t, '')}  {text}".strip() for t, text in group.events)
            # cut in the middle: the event's kind and its end ("(nf4)", a file's suffix) both stay readable
            label = QFontMetrics(item.label.textItem.font()).elidedText(group.label, Qt.TextElideMode.ElideMiddle, room)
            if item.shown != (label, tip):
                item.shown = (label, tip)
                item.label.setFormat(label)
                item.label.setToolTip(tip)
                item.setToolTip(tip)
        for item in self._marker_items[len(self.groups) :]:
            item.setVisible(False)

    # -- events -------------------------------------------------------------------------------------------------------
    def mark(self, text: str) -> None:
        """An event marker on the chart ('loaded base', 'attached alpha', 'merged'); a repeat within a second is
        the same event (the window and a panel may both announce it)."""
        now = time.monotonic()
        if self.markers and self.markers[-1][1] == text and now - self.markers[-1][0] < REPEAT_MARKER_S:
            return
        if len(self.markers) == self.markers.maxlen:
            self._marker_clock.pop(self.markers[0][0], None)
        self.markers.append((now, text))
        self._marker_clock[now] = time.strftime("%H:%M:%S")
        # drawn with the next redraw (within a second), not now: the event usually comes with a job's start or end,
        # which repaints much of the window already, and a chart redraw in the same turn made that stall longer
        self._markers_pending = True

    def marker_groups(self) -> list[tuple[str, str]]:
        """(label, tooltip) of each drawn marker, oldest first (what a user sees and reads on hover), the
        markers of events since the last sample included."""
        if self._markers_pending:
            self._redraw()
        return [item.shown for item in self._marker_items[: len(self.groups)]]

    def show_release(self, reclaimed: Reclaimed) -> None:
        """'deleted alpha: 1.4 MiB of RAM came back' on one line above the chart (full text in its tooltip)."""
        self.release_label.setText(reclaimed.message())
        self.release_label.setStyleSheet(
            "color: #b35900; font-weight: bold;" if reclaimed.leaked else "color: #2a7a2a;"
        )
        self.release_label.show()


def curve_color(key: str) -> str:
    """The fixed colour of a chart curve ("rss", "anon", "ram", "gpuN", "torch-cuda:N")."""
    if key in CURVE_COLORS:
        return CURVE_COLORS[key]
    index = key.rsplit(":", 1)[-1] if key.startswith("torch-") else key.removeprefix("gpu")
    return GPU_COLORS[int(index) % len(GPU_COLORS)] if index.isdigit() else COLORS[-1]


def process_text(sample: MemorySample) -> str:
    """The process line: RSS, and (where the OS says) how much of it is the process's own vs mapped files."""
    text = f"{swatch(CURVE_COLORS['rss'])} <b>This process</b> {format_bytes(sample.rss_bytes)} resident"
    if sample.has_rss_split:
        text += (
            f" = {swatch(CURVE_COLORS['anon'], 'dot')} {format_bytes(sample.rss_anon_bytes)} its own"
            f" + {format_bytes(sample.rss_file_bytes)} mapped files"
        )
    return text


def worker_text(sample: MemorySample) -> str:
    """The worker process's line (a training run): its RSS; empty while no worker runs."""
    if not sample.workers_rss_bytes:
        return ""
    return f"· {swatch(CURVE_COLORS['workers'])} <b>Worker process</b> {format_bytes(sample.workers_rss_bytes)}"


def system_text(sample: MemorySample) -> str:
    """The system line: RAM in use by every process (total - available) of the total."""
    pct = 100.0 * sample.ram_used_bytes / sample.ram_total_bytes if sample.ram_total_bytes else 0
    return (
        f"{swatch(CURVE_COLORS['ram'], 'dash')} <b>System RAM in use</b> {format_bytes(sample.ram_used_bytes)}"
        f" / {format_bytes(sample.ram_total_bytes)} ({pct:.0f}%)"
    )
