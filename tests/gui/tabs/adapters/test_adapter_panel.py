"""The Adapters tab: Try it streams with Stop, Ctrl+Enter and Compare's decoding settings; Detach; Unload all asks;
the inspector clears for the base and names the init method; the attach dialog opens where the last one ended."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from window_helpers import TIMEOUT_MS, idle

from lora_studio.gui.base.decoding import DecodingBox
from lora_studio.gui.tabs.adapters.panel import BASE_ROW


@pytest.fixture
def loaded(qtbot, window, tiny_llama, llama_adapters):
    """The window with tiny-llama and adapter-alpha attached (active)."""
    window.open_base(str(tiny_llama))
    idle(qtbot, window)
    window.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, window)
    return window


@pytest.fixture
def slow_steps(loaded):
    """Each forward pass of the real model takes ≥ 15 ms longer, so a generation spans many GUI timer ticks."""
    model = loaded.session.model.get_base_model()
    handle = model.register_forward_pre_hook(lambda *_: time.sleep(0.015))
    yield
    handle.remove()


def test_try_it_streams_tokens_as_they_come(qtbot, loaded, slow_steps):
    panel = loaded.adapter_panel
    assert isinstance(panel.try_it.decoding, DecodingBox)  # Compare's settings widget, reused
    panel.try_it.prompt_edit.setText("hello world")
    panel.try_it.max_tokens.setValue(30)
    seen: list[str] = []
    panel.try_it._flush_timer.timeout.connect(lambda: seen.append(panel.try_it.output.toPlainText()))
    job = panel.generate()
    assert job is not None and panel.try_it.stop_btn.isEnabled() and not panel.try_it.generate_btn.isEnabled()
    idle(qtbot, loaded)
    assert job.state == "finished", panel.message.text()
    final = panel.try_it.output.toPlainText()
    partial = [t for t in dict.fromkeys(seen) if t and t != final]
    assert len(partial) >= 2, seen  # text appeared in pieces while generating
    assert all(final.startswith(t) for t in partial)
    assert final == job.result.text and panel.try_it.streamed_tokens == len(job.result.token_ids)
    assert "tokens" in panel.message.text() and not panel.try_it.stop_btn.isEnabled()


def test_stop_ends_within_a_step_and_keeps_the_text(qtbot, loaded, slow_steps):
    panel = loaded.adapter_panel
    panel.try_it.prompt_edit.setText("hello world")
    panel.try_it.max_tokens.setValue(100)
    job = panel.generate()
    qtbot.waitUntil(lambda: panel.try_it.streamed_tokens >= 2, timeout=TIMEOUT_MS)
    qtbot.mouseClick(panel.try_it.stop_btn, Qt.MouseButton.LeftButton)
    idle(qtbot, loaded)
    assert job.state == "cancelled"
    assert 2 <= panel.try_it.streamed_tokens < 20  # stopped within a step or so, not at 100
    assert "stopped after" in panel.message.text() and panel.message.kind == "warn"
    assert panel.try_it.generate_btn.isEnabled() and not panel.try_it.stop_btn.isEnabled()


def test_ctrl_enter_runs_with_the_sampling_settings(qtbot, loaded):
    panel = loaded.adapter_panel
    loaded.activateWindow()
    panel.try_it.prompt_edit.setText("hello world")
    panel.try_it.max_tokens.setValue(8)
    panel.try_it.decoding.mode_combo.setCurrentText("sampling")
    panel.try_it.decoding.temperature.setValue(1.3)
    panel.try_it.decoding.seed.setValue(7)
    started = []
    loaded.runner.job_started.connect(started.append)
    panel.try_it.prompt_edit.setFocus()
    qtbot.keyClick(panel.try_it.prompt_edit, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    idle(qtbot, loaded)
    assert len(started) == 1 and started[0].name == "generating with adapter-alpha"  # one run, not two
    first = panel.try_it.output.toPlainText()
    panel.generate()
    idle(qtbot, loaded)
    assert panel.try_it.output.toPlainText() == first  # the same seed samples the same text
    panel.try_it.decoding.seed.setValue(8)
    texts = set()
    for seed in range(8, 12):
        panel.try_it.decoding.seed.setValue(seed)
        panel.generate()
        idle(qtbot, loaded)
        texts.add(panel.try_it.output.toPlainText())
    assert len(texts | {first}) > 1  # sampling really samples


def test_detach_and_unload_all_asks(qtbot, loaded, llama_adapters):
    w, panel = loaded, loaded.adapter_panel
    assert panel.detach_btn.text() == "Detach"
    panel.select("adapter-alpha")
    assert "untouched" in panel.detach_btn.toolTip()
    asked = []
    panel.confirm_unload = lambda names: asked.append(list(names)) or False
    assert panel.unload_all() is None and asked == [["adapter-alpha"]]
    assert [a[0] for a in w.session.state().adapters] == ["adapter-alpha"]  # "no" keeps them
    panel.confirm_unload = lambda names: True
    assert panel.unload_all() is not None
    idle(qtbot, w)
    assert w.session.state().adapters == ()
    assert Path(llama_adapters["alpha"], "adapter_config.json").is_file()  # the files stay
    w.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, w)
    panel.detach("adapter-alpha")
    idle(qtbot, w)
    assert w.session.state().adapters == () and "detached adapter-alpha" in [m for _, m in w.memory_panel.markers]


def test_inspector_clears_for_the_base_and_names_the_init(qtbot, loaded, llama_adapters, tmp_path):
    w, panel = loaded, loaded.adapter_panel
    olora = tmp_path / "olora-converted"
    shutil.copytree(llama_adapters["alpha"], olora)
    (olora / "lora_studio.json").write_text(json.dumps({"init_lora_weights": "olora", "converted_to_lora": True}))
    w.attach_adapter(str(olora))
    idle(qtbot, w)
    panel.select("olora-converted")
    qtbot.waitUntil(
        lambda: panel.inspection is not None and panel.inspection.name == "olora-converted", timeout=TIMEOUT_MS
    )
    assert panel.inspector.fields["init"].text() == "OLoRA, converted"
    assert "converted to plain LoRA" in panel.inspector.fields["init"].toolTip()
    panel.select(BASE_ROW)
    assert panel.inspection is None and "base" in panel.inspector.fields["name"].text()
    assert panel.inspector.fields["rank r"].text() == "–" and panel.inspector.chart_values is None
    assert panel.inspector.chart.getPlotItem().getAxis("bottom")._tickLevels is None  # no layers of the adapter
    panel.select("adapter-alpha")
    qtbot.waitUntil(
        lambda: panel.inspection is not None and panel.inspection.name == "adapter-alpha", timeout=TIMEOUT_MS
    )
    assert panel.inspector.fields["init"].text() == "random"  # the factory's init_lora_weights=False


def test_attach_dialog_opens_where_the_last_one_ended(qtbot, loaded, llama_adapters, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    w, panel = loaded, loaded.adapter_panel
    starts = []
    picks = iter([str(llama_adapters["beta"]), ""])
    monkeypatch.setattr(
        QFileDialog, "getExistingDirectory", lambda parent, title, start: starts.append(start) or next(picks)
    )
    panel.browse_attach()
    idle(qtbot, w)
    panel.browse_attach()  # cancelled: attaches nothing
    assert starts[1] == str(Path(llama_adapters["beta"]).parent)
    assert w.settings.last_folder("adapter") == str(Path(llama_adapters["beta"]).parent)
    assert [a[0] for a in w.session.state().adapters] == ["adapter-alpha", "adapter-beta"]


def test_a_side_job_failure_stays_in_its_panel(qtbot, loaded, llama_adapters, tmp_path):
    """One error line per panel: an inspection that fails says so in the inspector, not in the status bar too."""
    w, panel = loaded, loaded.adapter_panel
    spoilt = tmp_path / "spoilt"
    shutil.copytree(llama_adapters["alpha"], spoilt)
    w.attach_adapter(str(spoilt))
    idle(qtbot, w)
    before = w.job_status.label.text()
    (spoilt / "adapter_config.json").write_text("{ not json")  # spoilt on disk after attaching
    panel.select("spoilt")
    idle(qtbot, w)
    assert panel.inspection is None and panel.inspector.fields["notes"].text() not in ("", "–")
    assert w.job_status.label.text() == before
