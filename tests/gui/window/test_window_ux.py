"""The window at laptop sizes, session markers on the memory chart, closing during a job, the Help menu."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QScrollArea, QWidget
from window_helpers import TIMEOUT_MS, idle, make_window

from lora_studio.core.session import SessionState
from lora_studio.core.system.memory import Reclaimed
from lora_studio.gui.window.help import about_rows, window_shortcuts
from lora_studio.gui.window.main_window import session_markers

GiB = 1024**3


def _state(base="tiny", adapters=(), active=None) -> SessionState:
    return SessionState(base, f"/m/{base}" if base else None, "float32", "cpu", 10, tuple(adapters), active, True)


def _visible_in(scroll: QScrollArea, widget: QWidget) -> bool:
    """Whether all of ``widget`` lies inside the scroll area's viewport (seen without scrolling)."""
    viewport = scroll.viewport()
    top_left = widget.mapTo(viewport, QPoint(0, 0))
    bottom_right = widget.mapTo(viewport, QPoint(widget.width() - 1, widget.height() - 1))
    return widget.isVisible() and viewport.rect().contains(top_left) and viewport.rect().contains(bottom_right)


# -- layout at 1280x720 and 1280x820 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("height", [720, 820])
def test_laptop_sizes_show_load_loaded_inspector_and_the_memory_axis(
    qtbot, window, tiny_llama, llama_adapters, tmp_path, height
):
    w = window
    w.resize(1280, height)
    w.fit_docks()
    w.model_panel.set_source(str(tiny_llama))
    w.model_panel.load()
    idle(qtbot, w)
    # an adapter with a training log: the inspector has fields, the ‖ΔW‖ chart and the loss chart to show
    adapter = tmp_path / "with-loss"
    shutil.copytree(llama_adapters["alpha"], adapter)
    rows = [f"{step},{3.0 - step / 10:.3f},{3.1 - step / 10 if step % 3 == 0 else ''}" for step in range(12)]
    (adapter / "loss.csv").write_text("step,train_loss,val_loss\n" + "\n".join(rows) + "\n")
    w.attach_adapter(str(adapter))
    idle(qtbot, w)
    w.adapter_panel.select("with-loss")
    inspector = w.adapter_panel.inspector
    qtbot.waitUntil(lambda: inspector.loss_values is not None and bool(inspector.chart_values), timeout=TIMEOUT_MS)
    qtbot.wait(50)
    inspector_scroll = inspector.parentWidget().parentWidget()
    assert isinstance(inspector_scroll, QScrollArea)
    assert inspector_scroll.verticalScrollBar().value() == 0
    # the fields and the whole ‖ΔW‖ chart (its layer axis included) are seen together, without scrolling
    assert _visible_in(inspector_scroll, inspector.fields["name"]) and _visible_in(inspector_scroll, inspector.chart)
    qtbot.waitUntil(lambda: w.memory_panel.plot is not None, timeout=TIMEOUT_MS)
    qtbot.wait(50)
    model_scroll = w.model_dock.widget()
    assert isinstance(model_scroll, QScrollArea)
    assert model_scroll.verticalScrollBar().maximum() == 0  # the Base model column needs no scrolling
    assert _visible_in(model_scroll, w.model_panel.load_btn)
    assert _visible_in(model_scroll, w.model_panel.loaded_label)
    assert "tiny-llama" in w.model_panel.loaded_label.text()

    memory_scroll = w.memory_dock.widget()
    plot = w.memory_panel.plot
    before = plot.height()
    long = Reclaimed("detached a-very-long-adapter-name-that-goes-on " * 4, 64 * 2**20, 1 * 2**20)
    w.memory_panel.show_release(long)
    qtbot.wait(50)
    # the "came back" line is one elided line in a place kept for it: the chart (and its time axis) stays
    assert plot.height() == before
    assert memory_scroll.verticalScrollBar().maximum() == 0
    assert _visible_in(memory_scroll, plot)
    assert w.memory_panel.release_label.toolTip() == long.message()
    assert w.minimumSizeHint().height() <= 680


# -- memory readings -------------------------------------------------------------------------------------------------
def test_session_markers_for_activate_and_combine():
    two = (("alpha", "/a", 1), ("beta", "/b", 1))
    assert session_markers(_state(adapters=two, active="beta"), _state(adapters=two, active="alpha")) == [
        "activated alpha"
    ]
    mixed = (*two, ("mix", "combination (cat): alpha×1 + beta×1", 2))
    assert session_markers(_state(adapters=two, active="beta"), _state(adapters=mixed, active="beta")) == [
        "combined mix"
    ]
    # attach (marked by the panel) and a new base (marked by the window) add nothing here
    assert session_markers(_state(adapters=two[:1], active="alpha"), _state(adapters=two, active="beta")) == []
    assert session_markers(_state(base=None), _state(adapters=two, active="alpha")) == []


def test_activate_and_combine_put_markers_on_the_chart(qtbot, window, tiny_llama, llama_adapters):
    w = window
    w.open_base(str(tiny_llama))
    idle(qtbot, w)
    for key in ("alpha", "beta"):
        w.attach_adapter(str(llama_adapters[key]))
        idle(qtbot, w)
    w.adapter_panel.activate("adapter-alpha")
    idle(qtbot, w)
    session = w.session
    w.runner.submit(
        "combining",
        lambda *, cancel, report: session.register_combination(
            "mix", {"adapter-alpha": 1.0, "adapter-beta": 1.0}, "cat"
        ),
    )
    idle(qtbot, w)
    marks = [text for _, text in w.memory_panel.markers]
    assert "activated adapter-alpha" in marks and "combined mix" in marks


# -- closing during a job --------------------------------------------------------------------------------------------
def test_closing_during_a_job_asks_first(qtbot, window):
    w = window
    started, ended = threading.Event(), threading.Event()

    def slow(*, cancel, report):
        started.set()
        try:
            while not cancel.cancelled:
                time.sleep(0.01)
            cancel.raise_if_cancelled()
        finally:
            ended.set()

    asked: list[str] = []
    w.confirm_quit = lambda name: asked.append(name) or False
    job = w.runner.submit("merging slowly", slow)
    assert started.wait(10)
    w.close()
    assert asked == ["merging slowly"] and w.isVisible() and not job.done  # "no": the window and the job stay

    w.confirm_quit = lambda name: asked.append(name) or True
    w.close()
    assert asked == ["merging slowly", "merging slowly"] and not w.isVisible()
    assert ended.is_set() and w.runner.closed  # "yes": the job was cancelled and its worker waited for


def test_closing_while_idle_does_not_ask(qtbot, tmp_path, data_dir):
    from window_helpers import make_window

    w = make_window(qtbot, tmp_path)
    asked: list[str] = []
    w.confirm_quit = lambda name: asked.append(name) or False
    qtbot.waitUntil(lambda: w.runner.current is None, timeout=TIMEOUT_MS)
    w.close()
    assert asked == [] and not w.isVisible()


# -- Help menu -------------------------------------------------------------------------------------------------------
def test_help_menu_lists_shortcuts_and_about(qtbot, window):
    w = window
    menus = [a.text() for a in w.menuBar().actions()]
    assert "&Help" in menus
    keys = dict(window_shortcuts(w))
    assert keys.get("Ctrl+Q") == "Quit" and keys.get("Ctrl+O") == "Open model folder"
    assert keys.get("Ctrl+/") == "Keyboard shortcuts"
    w.menus.show_shortcuts()
    dialog = w.menus.shortcuts_dialog
    assert dialog.isVisible() and dialog.table.rowCount() == len(dialog.rows) >= 5
    texts = {dialog.table.item(r, 1).text() for r in range(dialog.table.rowCount())}
    assert "Quit" in texts and "load it" in texts
    dialog.close()

    rows = dict(about_rows())
    for name in ("LoRA Studio", "Python", "torch", "transformers", "peft", "PySide6", "Log file", "Data folder"):
        assert rows.get(name), name
    assert rows["PySide6"][0].isdigit() and rows["torch"] != "not installed"
    assert rows["Data folder"] == str(data_dir_of())
    w.menus.show_about()
    about = w.menus.about_dialog
    assert about.isVisible() and "transformers" in about.text.text() and rows["Data folder"] in about.text.text()
    about.close()


def data_dir_of():
    from lora_studio.core.io.paths import data_dir

    return data_dir()


def test_a_merge_result_does_not_squeeze_the_memory_chart(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    """At 1280x720 the Merge tab scrolls when its result box appears; the Memory dock keeps its height and axis."""
    w = window
    w.resize(1280, 720)
    w.fit_docks()
    w.open_base(str(tiny_llama))
    idle(qtbot, w)
    w.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, w)
    panel = w.merge_panel
    w.tabs.setCurrentWidget(panel)
    qtbot.waitUntil(lambda: w.memory_panel.plot is not None and bool(panel.rows), timeout=TIMEOUT_MS)
    for row in panel.rows:
        row.check.setChecked(True)
    panel.output.out_edit.setText(str(tmp_path / "merged"))
    qtbot.waitUntil(lambda: not panel.start_reason(), timeout=TIMEOUT_MS)
    qtbot.wait(50)
    dock_before, plot_before = w.memory_dock.height(), w.memory_panel.plot.height()
    assert panel.start_merge() is not None
    idle(qtbot, w)
    qtbot.waitUntil(panel.result_box.isVisible, timeout=TIMEOUT_MS)
    qtbot.wait(50)
    assert w.memory_dock.height() == dock_before
    assert w.memory_panel.plot.height() == plot_before
    assert w.minimumSizeHint().height() <= 680
    # the tab scrolled to the verdict: the badge is in view
    qtbot.waitUntil(lambda: _visible_in(panel.body_scroll, panel.result_box.badge), timeout=TIMEOUT_MS)


def test_reset_layout_and_a_collapsed_saved_layout_repaired(qtbot, tmp_path, data_dir):
    from lora_studio.gui.window.main_window import (
        MIN_MODEL_DOCK_WIDTH,
        USABLE_BOTTOM_DOCK_HEIGHT,
        USABLE_MODEL_DOCK_WIDTH,
    )

    w = make_window(qtbot, tmp_path)
    w.resize(1280, 720)
    w.log_dock.hide()
    w.memory_dock.setFloating(True)
    w.menus.reset_layout_action.trigger()
    qtbot.waitUntil(lambda: w.log_dock.isVisible() and not w.memory_dock.isFloating())
    qtbot.waitUntil(lambda: w.model_dock.width() >= USABLE_MODEL_DOCK_WIDTH and not w.collapsed_docks())
    # 1000 x 600 squeezes the docks; back at 1280 x 720 they are usable again (Qt would leave them squeezed)
    w.resize(1000, 600)
    qtbot.waitUntil(lambda: w.width() < 1280)  # as small as the window's minimum allows
    w.resizeDocks([w.memory_dock, w.log_dock], [40, 40], Qt.Orientation.Vertical)
    w.resizeDocks([w.model_dock], [MIN_MODEL_DOCK_WIDTH], Qt.Orientation.Horizontal)
    w.resize(1280, 720)
    qtbot.waitUntil(
        lambda: w.model_dock.width() >= USABLE_MODEL_DOCK_WIDTH and w.memory_dock.height() >= USABLE_BOTTOM_DOCK_HEIGHT,
        timeout=5000,
    )
    # a layout saved with the Base model column squeezed to ~60 px (as a window of 1000 x 600 left it before the
    # column had a minimum width) opens with the column usable
    w.model_dock.setMinimumWidth(0)
    w.resizeDocks([w.model_dock], [60], Qt.Orientation.Horizontal)
    qtbot.waitUntil(lambda: w.model_dock.width() < MIN_MODEL_DOCK_WIDTH)
    w.settings.save_window(w.saveGeometry(), w.saveState())
    w.shutdown()
    again = make_window(qtbot, tmp_path)
    again.resize(1280, 720)
    qtbot.waitUntil(lambda: again.model_dock.width() >= USABLE_MODEL_DOCK_WIDTH, timeout=5000)
    assert not again.collapsed_docks() and again.memory_dock.height() >= USABLE_BOTTOM_DOCK_HEIGHT
    again.shutdown()


def test_a_resize_before_the_window_has_started_is_repaired_once_it_has(qtbot, tmp_path, data_dir):
    """A resize that came before the start-up turn (a slow machine, a test) once left the Base model column
    squeezed until the next resize; whichever came first, the docks were then laid out as the timing fell."""
    from lora_studio.gui.window.main_window import USABLE_MODEL_DOCK_WIDTH

    w = make_window(qtbot, tmp_path)
    w.resize(1280, 720)  # the start-up turn (_after_shown) has not run yet: no repair timer to start
    qtbot.waitUntil(lambda: w.model_dock.width() >= USABLE_MODEL_DOCK_WIDTH and not w.collapsed_docks(), timeout=5000)
    w.shutdown()


def test_loading_another_base_asks_before_it_detaches_the_adapters(
    qtbot, window, tiny_llama, tiny_llama_tied, llama_adapters
):
    window.open_base(str(tiny_llama))
    idle(qtbot, window)
    window.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, window)
    asked: list = []
    window.model_panel.confirm_replace_base = lambda names: asked.append(list(names)) or False
    assert window.open_base(str(tiny_llama_tied)) is None
    assert asked == [["adapter-alpha"]] and window.session_model.state.adapters  # kept
    assert window.load_demo() is None and asked[-1] == ["adapter-alpha"]  # File → Open the demo asks as well
    file_menu = window.menuBar().actions()[0].menu()
    assert "Open the &demo" in [a.text() for a in file_menu.actions()]
    assert "adapter-alpha" in window.adapter_panel.message.text()  # "attached …"
    window.model_panel.confirm_replace_base = lambda names: True
    assert window.open_base(str(tiny_llama_tied)) is not None
    idle(qtbot, window)
    assert not window.session_model.state.adapters
    assert window.adapter_panel.message.text() == ""  # nothing said of the last base stays


def test_the_adapter_just_attached_is_the_one_chosen_to_judge(qtbot, window, tiny_llama, llama_adapters):
    """Evaluate's sweep and Reduce choose a newly attached adapter (the one just trained or attached); a choice the
    user made stays through session changes that add none."""
    window.open_base(str(tiny_llama))
    idle(qtbot, window)
    window.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, window)
    sweep, cut = window.evaluate_panel.scale_box.scale_adapter, window.reduce_panel.cut.adapter_combo
    assert sweep.currentText() == cut.currentText() == "adapter-alpha"
    window.attach_adapter(str(llama_adapters["beta"]))
    idle(qtbot, window)
    assert sweep.currentText() == cut.currentText() == "adapter-beta"
    sweep.setCurrentText("adapter-alpha")
    window.adapter_panel.activate("adapter-alpha")  # a session change that attaches nothing new
    idle(qtbot, window)
    assert window.session_model.state.active_adapter == "adapter-alpha" and sweep.currentText() == "adapter-alpha"


def test_at_1000x600_nothing_scrolls_sideways(qtbot, window, tiny_llama, llama_adapters):
    """The smallest window the README names: the Base model column whole, the Merge tab's boxes one above the other
    in every format (side by side they need ~800 pixels)."""
    window.open_base(str(tiny_llama))
    idle(qtbot, window)
    window.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, window)
    window.resize(1000, 600)
    merge = window.merge_panel
    window.tabs.setCurrentWidget(merge)
    qtbot.waitUntil(lambda: window.width() == 1000, timeout=TIMEOUT_MS)
    column = window.model_dock.widget()
    for fmt in ("hf", "gguf", "gguf-lora"):
        merge.output.format_combo.setCurrentIndex(merge.output.format_combo.findData(fmt))
        qtbot.wait(200)
        assert window.width() == 1000, fmt
        assert merge.body_scroll.horizontalScrollBar().maximum() == 0, fmt
        assert column.horizontalScrollBar().maximum() == 0, fmt
