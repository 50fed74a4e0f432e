"""The Reduce tab as a user drives it: pick an adapter, read its suggestions, cut it, see the cost, find it attached."""

from __future__ import annotations

import json

import pytest
from window_helpers import TIMEOUT_MS, idle

pytestmark = pytest.mark.usefixtures("one_thread")


def reduce_panel_with(qtbot, window, base, adapter):
    """The Reduce tab once ``adapter`` is attached to ``base`` and its spectra are read."""
    window.open_base(str(base))
    idle(qtbot, window)
    window.attach_adapter(str(adapter))
    idle(qtbot, window)
    panel = window.reduce_panel
    qtbot.waitUntil(lambda: panel.plan is not None, timeout=TIMEOUT_MS)
    assert panel._plot is None  # a hidden tab's chart is drawn when the tab is first shown
    window.tabs.setCurrentWidget(panel)
    return panel


def test_reduce_an_attached_adapter_and_measure_it(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    panel = reduce_panel_with(qtbot, window, tiny_llama, llama_adapters["beta"])
    assert panel.plan.r == 8 and panel.cut.suggestions.rowCount() == 3
    assert panel._plot is not None and "rank 8 →" in panel.cut.preview.text()

    # a suggestion row picks the cut; the rank spin and the default output follow
    panel.cut.suggestions.cellClicked.emit(0, 1)
    assert panel.mode() == "rank" and panel.cut.rank_spin.value() == panel.plan.suggestions()[0].uniform_rank
    panel.cut.rank_spin.setValue(2)
    assert panel.cut.out_edit.text().endswith("adapter-beta-r2")
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"prompt": "Say hello.", "completion": "Hello there."}) + "\n")
    panel.set_data_files([data])
    panel.cut.out_edit.setText(str(tmp_path / "beta-r2"))
    assert panel.run_btn.isEnabled()
    assert panel.run() is not None
    qtbot.waitUntil(lambda: panel.result is not None, timeout=TIMEOUT_MS)
    idle(qtbot, window)
    result, cost = panel.result
    assert result.r_after == 2 and cost is not None and cost.kl > 0
    assert "KL from the original" in panel.result_label.text()
    assert (tmp_path / "beta-r2" / "adapter_config.json").is_file()
    names = [name for name, _path, _size in window.session_model.state.adapters]
    assert names == ["adapter-beta", "beta-r2"]
    assert window.session.active_adapter == "adapter-beta"  # the original stays active
    assert panel.cut.adapter_combo.currentText() == "adapter-beta"  # and stays the one to reduce

    # energy mode: per-module ranks
    panel.cut.mode_combo.setCurrentIndex(1)
    panel.cut.energy_spin.setValue(99.0)
    assert panel.cut.energy_spin.isVisibleTo(panel) and not panel.cut.rank_spin.isVisibleTo(panel)
    assert "keeps" in panel.cut.preview.text()


def test_reduce_refuses_an_output_over_the_adapter(qtbot, window, tiny_llama, llama_adapters):
    panel = reduce_panel_with(qtbot, window, tiny_llama, llama_adapters["alpha"])
    panel.cut.measure_check.setChecked(False)
    panel.cut.out_edit.setText(str(llama_adapters["alpha"]))
    panel.run()
    idle(qtbot, window)
    assert panel.message.kind == "error" and "would be replaced" in panel.message.text()
    assert panel.result is None
