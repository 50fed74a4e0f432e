"""The Train tab trains through the window's real job runner, draws both curves and attaches the result."""

from __future__ import annotations

import json

from window_helpers import TIMEOUT_MS, idle, make_window

WORDS = ["cat", "dog", "sun", "sea", "red", "blue", "one", "two"]


def train_tab(qtbot, tmp_path, base):
    """A window with ``base`` loaded and its Train tab given a small data file."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": f"{w} {w}"}) + "\n" for w in WORDS * 3))
    window = make_window(qtbot, tmp_path)
    window.open_base(str(base))
    idle(qtbot, window)
    return window, window.train_panel, data


def test_train_tab_end_to_end(qtbot, tmp_path, tiny_llama):
    window, panel, data = train_tab(qtbot, tmp_path, tiny_llama)
    window.tabs.setCurrentWidget(panel)
    assert not panel.start_btn.isEnabled() and "training data" in panel.start_btn.toolTip()
    panel.files.data_edit.setText(str(data))
    panel.files.out_edit.setText(str(tmp_path / "trained"))
    panel.form.max_steps.setValue(12)
    panel.form.eval_steps.setValue(3)
    panel.form.learning_rate.setText("5e-3")
    assert panel.start_btn.isEnabled()

    panel.preview()
    qtbot.waitUntil(lambda: "row 1" in panel.data_preview.preview_view.toPlainText(), timeout=TIMEOUT_MS)
    assert "say cat" in panel.data_preview.preview_view.toPlainText()
    assert "color:#999" in panel.data_preview.preview_view.toHtml().replace(" ", "")  # the prompt is greyed
    qtbot.waitUntil(lambda: "needs about" in panel.data_preview.estimate_label.text(), timeout=TIMEOUT_MS)

    job = panel.start()
    assert job is not None and panel.stop_btn.isEnabled()
    qtbot.waitUntil(lambda: job.done, timeout=120_000)
    assert job.state == "finished", panel.message.text()
    train_x, _ = panel.series["lora:train"]
    val_x, _ = panel.series["lora:val"]
    assert train_x == list(range(1, 13)) and val_x == [0, 3, 6, 9, 12]
    assert "step 12/12" in panel.chart.stats_label.text()
    # the chart: the x axis spans the run; no baseline ran, so the legend does not list one
    x_range = panel.plot.getPlotItem().getViewBox().viewRange()[0]
    assert x_range[0] <= 0 and 12 <= x_range[1] < 13
    legend = panel.plot.getPlotItem().legend
    assert [label.text for _, label in legend.items] == ["training loss", "validation loss"]
    assert f"val {panel.series['lora:val'][1][-1]:.4f}" in panel.chart.stats_label.text()  # the final evaluation's
    assert "Saved" in panel.summary.summary_label.text()
    assert panel.result.adapter.name == "trained"
    if panel.result.alternative is not None:  # best and last differ: the end of the run offers the other ones
        assert not panel.summary.swap_btn.isHidden() and panel.result.alternative.kind in panel.summary.swap_btn.text()
    # attached to the session automatically: the Adapters, Compare and Merge tabs see it
    qtbot.waitUntil(lambda: any(a[0] == "trained" for a in window.session_model.state.adapters), timeout=TIMEOUT_MS)
    idle(qtbot, window)


def test_stop_then_resume_in_the_window(qtbot, tmp_path, tiny_llama):
    window, panel, data = train_tab(qtbot, tmp_path, tiny_llama)
    panel.files.data_edit.setText(str(data))
    panel.files.out_edit.setText(str(tmp_path / "run"))
    panel.form.max_steps.setValue(400)
    panel.form.save_steps.setValue(1000)
    job = panel.start()
    qtbot.waitUntil(lambda: "lora:train" in panel.series and len(panel.series["lora:train"][0]) >= 2, timeout=60_000)
    panel.stop()
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    assert job.state == "cancelled"
    assert panel.last_checkpoint is not None and panel.last_checkpoint.is_dir()
    assert "Resume continues from checkpoint-" in panel.message.text()
    stopped_at = int(panel.last_checkpoint.name.split("-")[-1])
    panel.form.max_steps.setValue(stopped_at + 3)
    panel.resume()
    qtbot.waitUntil(lambda: panel.result is not None, timeout=60_000)
    assert panel.result.lora.steps == stopped_at + 3
    assert panel.series["lora:train"][0][-1] == stopped_at + 3
    idle(qtbot, window)


def test_the_suggested_output_folder_is_one_no_run_has_used(qtbot, tmp_path, data_dir):
    """A second run of the same settings got the first run's folder, and Train then refused it."""
    from lora_studio.gui.tabs.train.panel import TrainPanel

    window = make_window(qtbot, tmp_path)
    panel: TrainPanel = window.train_panel
    data = tmp_path / "pirate.train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n', "utf-8")
    parent = tmp_path / "trained"
    (parent / "pirate-r8").mkdir(parents=True)
    (parent / "pirate-r8-2.checkpoints").mkdir()
    panel.files.data_edit.setText(str(data))
    assert panel._suggested_out(parent) == parent / "pirate-r8-3"
    window.shutdown()
