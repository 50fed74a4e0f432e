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
    view_box = panel.plot.getPlotItem().getViewBox()  # the legend sits above the plot area, over none of its lines
    assert legend.sceneBoundingRect().bottom() <= view_box.sceneBoundingRect().top()
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


def test_training_beside_the_window_then_the_next_name_and_the_replace_question(qtbot, tmp_path, tiny_llama):
    """A run the memory holds beside the session leaves the window's model jobs free; its folder is then taken, so
    the next name moves on; a folder that exists is asked about before anything runs (no CLI flag in a window)."""
    window, panel, data = train_tab(qtbot, tmp_path, tiny_llama)
    window.tabs.setCurrentWidget(panel)
    panel.files.data_edit.setText(str(data))
    first = tmp_path / "runs" / "pairs-r8"
    panel.files.out_edit.setText(str(first))
    panel.form.max_steps.setValue(2)
    panel.form.eval_steps.setValue(1)
    qtbot.waitUntil(lambda: panel.data_preview.memory is not None, timeout=TIMEOUT_MS)
    assert panel.data_preview.room_beside_the_session()  # a tiny model on this machine
    job = panel.start()
    assert job is not None and not job.exclusive
    assert window.runner.busy_reason == "" and "usable" in panel.message.text()
    assert window.job_status.label.text() == "training (beside the window)…"  # not the last model job's "done"
    other = window.runner.submit("comparing", lambda *, cancel, report: None)  # a model job beside the run
    qtbot.waitUntil(lambda: other.done, timeout=TIMEOUT_MS)
    if not job.done:
        assert window.job_status.label.text() == "comparing: done · training (beside the window)…"
    assert not panel.start_btn.isEnabled() and "training run" in panel.start_btn.toolTip()
    qtbot.waitUntil(lambda: job.done, timeout=120_000)
    assert job.state == "finished", panel.message.text()
    assert window.job_status.label.text() == "training: done"
    assert panel.files.out_edit.text() == str(tmp_path / "runs" / "pairs-r8-2")  # the next free name
    qtbot.waitUntil(lambda: any(a[0] == "pairs-r8" for a in window.session_model.state.adapters), timeout=TIMEOUT_MS)
    idle(qtbot, window)

    series = dict(panel.series)
    asked: list = []
    panel.files.out_edit.setText(str(first))
    panel.confirm_replace = lambda out: asked.append(out) or False
    assert panel.start() is None and asked == [first]
    assert panel.series == series and "exists" in panel.message.text()  # nothing cleared, nothing ran
    panel.confirm_replace = lambda out: True
    job = panel.start()
    assert job is not None
    qtbot.waitUntil(lambda: job.done, timeout=120_000)
    assert job.state == "finished", panel.message.text()
    idle(qtbot, window)


def test_durations_read_as_durations():
    from lora_studio.gui.tabs.train.chart import format_duration

    assert [format_duration(s) for s in (None, 42, 949, 7500)] == ["…", "42 s", "15 min 49 s", "2 h 05 min"]


def test_an_olora_folder_is_named_for_the_rank_it_holds(qtbot, tmp_path, data_dir):
    window = make_window(qtbot, tmp_path)
    panel = window.train_panel
    panel.files.data_edit.setText(str(tmp_path / "pirate.train.jsonl"))
    panel.form.r.setValue(8)
    panel.form.init.setCurrentIndex(panel.form.init.findData("olora"))
    assert panel.files.suggested_out(tmp_path).name == "pirate-olora-r16"  # saved converted, at twice the rank
    window.shutdown()


def test_the_wheel_changes_a_setting_only_once_it_is_clicked(qtbot, tmp_path, data_dir):
    from PySide6.QtCore import QPoint, QPointF, Qt
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication

    window = make_window(qtbot, tmp_path)
    panel = window.train_panel
    window.tabs.setCurrentWidget(panel)
    rank = panel.form.r
    before = rank.value()

    def wheel(field=rank) -> None:
        at = QPointF(5, 5)
        event = QWheelEvent(
            at,
            QPointF(field.mapToGlobal(QPoint(5, 5))),
            QPoint(0, 0),
            QPoint(0, 120),
            Qt.MouseButton.NoButton,
            Qt.KeyboardModifier.NoModifier,
            Qt.ScrollPhase.NoScrollPhase,
            False,
        )
        QApplication.sendEvent(field, event)

    wheel()
    assert rank.value() == before  # scrolling past the form leaves the rank alone
    gpu = window.merge_panel.output.serve_gpu_spin  # and the Merge tab's GPU size
    gpu_before = gpu.value()
    wheel(gpu)
    assert gpu.value() == gpu_before
    window.activateWindow()
    rank.setFocus()
    if rank.hasFocus():  # focus needs an active window, which some platforms do not give an offscreen one
        wheel()
        assert rank.value() != before
    window.shutdown()
