"""The Memory dock: what each reading says, a worker's reading without relayout, markers grouped with tooltips."""

from __future__ import annotations

import itertools
import time

import pytest
from window_helpers import TIMEOUT_MS, idle

from lora_studio.core.system.memory import MemorySample, MemorySampler, read_rss_split
from lora_studio.gui.docks.memory import (
    MAX_MARKERS,
    MemoryMonitor,
    MemoryPanel,
    group_markers,
    process_text,
    system_text,
    worker_text,
)

GiB = 1024**3


def test_rss_split_from_proc_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nVmRSS:\t  3000 kB\nRssAnon:\t  1000 kB\nRssFile:\t  1900 kB\nRssShmem:\t 100 kB\n")
    assert read_rss_split(str(status)) == (1000 * 1024, 2000 * 1024)
    assert read_rss_split(str(tmp_path / "missing")) == (0, 0)
    sample = MemorySampler(open_nvml=False).sample()
    assert sample.rss_anon_bytes > 0 and sample.has_rss_split  # Linux: the real process has both
    assert sample.rss_anon_bytes + sample.rss_file_bytes <= sample.rss_bytes * 1.2


def test_readings_say_what_each_number_is(qtbot, window):
    panel = window.memory_panel
    qtbot.waitUntil(lambda: len(panel.samples) >= 2, timeout=TIMEOUT_MS)
    assert "its own" in panel.ram_label.text() and "mapped files" in panel.ram_label.text()
    assert "System RAM in use" in panel.system_label.text()
    assert "page cache" in panel.ram_label.toolTip() and "mmap" in panel.ram_label.toolTip()
    assert "total - available" in panel.system_label.toolTip()
    # mapped weights: RSS (2 GiB, most of it file pages) above the system's "in use" (1.7 GiB) reads as it is
    sample = MemorySample(0.0, 2 * GiB, int(1.7 * GiB), 16 * GiB, rss_anon_bytes=GiB // 2, rss_file_bytes=3 * GiB // 2)
    assert "512.0 MiB its own" in process_text(sample) and "1.50 GiB mapped files" in process_text(sample)
    assert "1.70 GiB" in system_text(sample) and "(11%)" in system_text(sample)
    qtbot.waitUntil(lambda: panel.plot is not None and "anon" in panel.curve_names(), timeout=TIMEOUT_MS)
    assert panel.plot.getPlotItem().legend is None  # the readings are the legend: nothing covers the markers


def test_a_worker_process_reading_does_not_resize_the_memory_dock(qtbot, window):
    """Longer readings once widened the dock and re-laid out the window (a ~50 ms stall as a training run began)."""
    import dataclasses

    window.resize(1280, 720)
    panel = window.memory_panel
    qtbot.waitUntil(lambda: len(panel.samples) >= 1 and panel.plot is not None, timeout=TIMEOUT_MS)
    panel.monitor.sampled.disconnect(panel.on_sample)  # only the samples below
    quiet = dataclasses.replace(panel.samples[-1], workers_rss_bytes=0)
    panel.on_sample(quiet)
    # the window's own work (its start-up jobs) and its layout after the resize settle first, slowly on a loaded
    # machine: only then is a change of width the reading's doing
    idle(qtbot, window)
    # the resize's layout repair (a timer, later than its 300 ms on a loaded machine) may refit the docks
    qtbot.waitUntil(
        lambda: window._repair_timer is not None and not window._repair_timer.isActive(), timeout=TIMEOUT_MS
    )
    widths: list[tuple[int, int]] = []
    for _ in range(60):
        qtbot.wait(100)
        widths.append((panel.width(), panel.plot.height()))
        if len(widths) >= 5 and len(set(widths[-5:])) == 1:
            break
    before = (panel.width(), panel.plot.height())
    busy = dataclasses.replace(quiet, rss_bytes=40 * GiB, rss_anon_bytes=30 * GiB, workers_rss_bytes=int(1.3 * GiB))
    panel.on_sample(busy)
    qtbot.wait(50)
    assert "Worker process" in panel.worker_label.text() and panel.worker_label.isVisible()
    assert worker_text(quiet) == "" and (panel.width(), panel.plot.height()) == before
    panel.on_sample(quiet)
    qtbot.wait(50)
    assert not panel.worker_label.isVisible() and (panel.width(), panel.plot.height()) == before


def test_group_markers_merges_close_events_only():
    groups = group_markers([(10.0, "a"), (10.5, "b"), (11.0, "c"), (30.0, "d"), (31.9, "e"), (34.5, "f")], 2.0)
    assert [g.label for g in groups] == ["3 events", "2 events", "f"]
    assert [t for t, _ in groups[0].events] == [10.0, 10.5, 11.0] and groups[1].time == 30.0
    assert all(b.time - a.time >= 2.0 for a, b in itertools.pairwise(groups))


@pytest.fixture
def panel(qtbot):
    """A memory panel with its chart built, sampling every 50 ms."""
    monitor = MemoryMonitor(MemorySampler(open_nvml=False), 0.05)
    panel = MemoryPanel(monitor)
    qtbot.addWidget(panel)
    panel.resize(560, 200)
    panel.show()
    panel.build_chart()
    monitor.start()
    try:
        yield panel
    finally:
        monitor.close()


def test_close_markers_collapse_with_a_tooltip_and_far_ones_stay_apart(qtbot, panel, tmp_path, data_dir):
    qtbot.waitUntil(lambda: len(panel.samples) >= 2, timeout=TIMEOUT_MS)
    now = time.monotonic()
    panel.markers.extend([(now - 60, "loaded tiny-llama"), (now - 30, "merged")])
    for text in ("attached alpha", "attached beta", "activated alpha"):
        panel.mark(text)
    panel.mark("activated alpha")  # the same event said twice (window and panel): one marker
    groups = panel.marker_groups()
    assert [label for label, _ in groups][1:] == ["merged", "3 events"]
    # a label longer than the chart is tall is elided; its tooltip has the full text (and the time)
    head, _, tail = groups[0][0].partition("…")  # cut in the middle: its kind and its end both show
    assert "loaded tiny-llama" in groups[0][1] and "loaded tiny-llama".startswith(head) and "tiny-llama".endswith(tail)
    tip = groups[-1][1]
    assert tip.count("\n") == 2 and "attached alpha" in tip and "activated alpha" in tip
    assert sum(text == "activated alpha" for _, text in panel.markers) == 1
    line = panel._marker_items[2]
    assert line.label.toolTip() == tip and line.toolTip() == tip
    # what Qt shows on hover: the first item under the cursor that has a tooltip (QGraphicsScene.helpEvent)
    centre = line.label.mapToScene(line.label.boundingRect().center())
    under = [item.toolTip() for item in panel.plot.scene().items(centre) if item.toolTip()]
    assert under and under[0] == tip


def test_the_charts_marker_lines_are_a_fixed_set_made_with_the_chart(qtbot, panel):
    """The chart holds one hidden line per marker it can show from the start: a long session adds no items to it."""
    assert len(panel._marker_items) == MAX_MARKERS and not any(line.isVisible() for line in panel._marker_items)
    qtbot.waitUntil(lambda: len(panel.samples) >= 2, timeout=TIMEOUT_MS)
    items = list(panel.plot.getPlotItem().items)  # the curves come with the first samples
    now = time.monotonic()
    panel.markers.extend((now - 100 + 3 * i, f"event {i}") for i in range(2 * MAX_MARKERS))  # 30 kept
    panel.mark("one more")
    assert len(panel.marker_groups()) > 1
    shown = [line for line in panel._marker_items if line.isVisible()]
    assert len(shown) == len(panel.groups)
    # pyqtgraph drops a label's text set while its line is hidden: each line shown says its group's label
    assert [line.label.textItem.toPlainText() for line in shown] == [label for label, _ in panel.marker_groups()]
    assert list(panel.plot.getPlotItem().items) == items
