"""The Evaluate tab as a user drives it: evaluate, read the tables, open an example in Compare, sweep, merge."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import Qt
from window_helpers import TIMEOUT_MS, idle

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"instruction": "Say hello.", "answer": "Hello there."},
    {"instruction": "Count to three.", "answer": "One, two, three."},
]


@pytest.fixture
def loaded(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    window.open_base(str(tiny_llama))
    idle(qtbot, window)
    for path in llama_adapters.values():
        window.attach_adapter(str(path))
        idle(qtbot, window)
    data = []
    for name in ("one", "two"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        data.append(path)
    panel = window.evaluate_panel
    panel.set_data_files(data)
    return window, panel


def test_evaluate_shows_summary_by_set_and_examples(qtbot, loaded):
    window, panel = loaded
    assert [name for name, _kind in panel.ticked()] == ["base", "adapter-alpha", "adapter-beta"]
    assert panel.variants.reference_combo.currentText() == "base"
    assert panel.run() is not None
    qtbot.waitUntil(lambda: panel.result is not None, timeout=TIMEOUT_MS)
    idle(qtbot, window)
    assert panel.summary.summary_table.rowCount() == 3
    assert panel.summary.summary_table.item(0, 0).text() == "base"
    assert panel.summary.by_set_table.isVisibleTo(panel) and panel.summary.by_set_table.columnCount() == 2
    assert panel.examples.examples_table.rowCount() == 4
    assert "base" in panel.summary.verdict.text() and panel.save_btn.isEnabled()
    panel.summary.set_combo.setCurrentText("one")
    assert panel.summary.summary_table.rowCount() == 3

    # a double-click opens the example in Compare with the same variants and runs it
    panel.examples.examples_table.cellDoubleClicked.emit(0, 2)
    compare = window.compare_panel
    assert window.tabs.currentWidget() is compare
    idle(qtbot, window)
    prompt = panel.examples.examples_table.item(0, 2).toolTip().split("\n\n")[0]
    assert compare.prompts == [prompt]
    assert len(compare.ticked()) == 3


def test_sweep_then_use_the_best_scale_in_merge(qtbot, loaded):
    window, panel = loaded
    panel.scale_box.scale_adapter.setCurrentText("adapter-beta")
    panel.scale_box.scale_values.setText("0, 1")
    assert panel.run_sweep() is not None
    qtbot.waitUntil(lambda: panel.sweep is not None, timeout=TIMEOUT_MS)
    idle(qtbot, window)
    assert [p.scale for p in panel.sweep.points] == [0.0, 1.0]
    assert "best scale" in panel.scale_box.best_label.text()
    assert panel.scale_box.merge_scale_btn.isEnabled()
    qtbot.mouseClick(panel.scale_box.merge_scale_btn, Qt.MouseButton.LeftButton)
    merge = window.merge_panel
    assert window.tabs.currentWidget() is merge
    rows = merge.checked_rows()
    assert [r.name for r in rows] == ["adapter-beta"] and rows[0].weight == panel.sweep.best.scale
    specs, _options = merge.request()
    assert specs[0].weight == panel.sweep.best.scale

    qtbot.mouseClick(panel.scale_box.apply_scale_btn, Qt.MouseButton.LeftButton)
    idle(qtbot, window)
    assert window.session_model.state.scale_of("adapter-beta") == panel.sweep.best.scale


def test_bad_scales_are_one_line(qtbot, loaded):
    _window, panel = loaded
    panel.scale_box.scale_values.setText("0:1:0")
    assert panel.run_sweep() is None
    assert "positive" in panel.message.text()


def test_the_sweep_runs_on_the_set_chosen_for_it(qtbot, loaded, tmp_path):
    window, panel = loaded
    box = panel.scale_box
    assert box.scale_data.currentText() == "all 2 evaluation files"  # no set of the adapter's own
    box.scale_data.setCurrentIndex(box.scale_data.findData(str(tmp_path / "two.jsonl")))
    box.scale_values.setText("0, 1")
    assert panel.run_sweep() is not None
    qtbot.waitUntil(lambda: panel.sweep is not None, timeout=TIMEOUT_MS)
    idle(qtbot, window)
    assert panel.sweep.data == ("two",) and "on two" in box.best_label.text()
    # an adapter trained in the app names its validation set: it is offered first and chosen
    own = tmp_path / "own.val.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    box.set_data_choices(panel.data_files(), own)
    assert box.scale_data.currentData() == str(own) and box.sweep_files(panel.data_files()) == [own]
