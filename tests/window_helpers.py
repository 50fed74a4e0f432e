"""Opening a real main window for a test (offscreen), shared by the GUI tests."""

from __future__ import annotations

from lora_studio.core.system.memory import MemorySampler
from lora_studio.gui.base.settings import StudioSettings
from lora_studio.gui.window.main_window import MainWindow

TIMEOUT_MS = 30_000


def make_window(qtbot, tmp_path, sampler=None, sample_interval_s: float = 0.05) -> MainWindow:
    """A shown window with its settings in tmp_path and no real NVML unless a sampler says otherwise."""
    window = MainWindow(
        sampler=sampler or MemorySampler(open_nvml=False),
        settings=StudioSettings(tmp_path / "window.ini"),
        sample_interval_s=sample_interval_s,
    )
    # pytest-qt closes the window after each test; a job still running then (a slow machine) must not open the
    # modal "Quit?" question, which nothing in a test answers: the run would wait for ever
    window.confirm_quit = lambda _job_name: True
    window.model_panel.confirm_replace_base = lambda _attached: True  # likewise "Load another base?"
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


def idle(qtbot, window, timeout: int = TIMEOUT_MS) -> None:
    qtbot.waitUntil(window.runner.is_idle, timeout=timeout)


def merge_panel_with(qtbot, window, base, *adapters):
    """The window with ``base`` loaded and ``adapters`` attached, showing its Merge panel (rows for each adapter)."""
    from pathlib import Path

    window.open_base(str(base))
    idle(qtbot, window)
    for path in adapters:
        window.attach_adapter(str(path))
        idle(qtbot, window)
    panel = window.merge_panel
    window.tabs.setCurrentWidget(panel)
    qtbot.waitUntil(lambda: [r.name for r in panel.rows] == [Path(p).name for p in adapters], timeout=TIMEOUT_MS)
    return panel


def plan_settled(qtbot, panel) -> None:
    """Until the Merge panel's plan for the current inputs is in."""
    qtbot.waitUntil(lambda: not panel.plan_pending and panel.runner.is_idle(), timeout=TIMEOUT_MS)
