"""The window through its real worker: load, attach two adapters, switch, delete, unload; cancel; errors; memory."""

from __future__ import annotations

from pathlib import Path

import pytest
from window_helpers import idle, make_window

from lora_studio.core.system.memory import MemorySampler
from lora_studio.core.system.nvml import GpuReading
from lora_studio.gui.tabs.adapters.panel import BASE_ROW
from lora_studio.gui.window.drop import drop_kind

GiB = 1024**3
TIMEOUT = 30_000


class FakeNvml:
    def device_count(self) -> int:
        return 2

    def read(self, index: int) -> GpuReading:
        return GpuReading(index, ["Fake A100", "Fake H100"][index], (index + 2) * GiB, 80 * GiB, 42)

    def close(self) -> None:
        pass


def test_load_attach_switch_delete_unload(qtbot, window, tiny_llama, llama_adapters):
    w = window
    w.model_panel.set_source(str(tiny_llama))
    qtbot.waitUntil(lambda: "fits" in w.model_panel.verdict_label.text(), timeout=TIMEOUT)  # verdict before loading
    assert not w.session.loaded
    w.model_panel.load()
    assert not w.adapter_panel.attach_btn.isEnabled()  # busy: conflicting buttons are off, with the reason
    assert w.adapter_panel.attach_btn.toolTip().startswith("busy: loading")
    idle(qtbot, w)
    assert w.session.loaded and "tiny-llama" in w.model_panel.loaded_label.text()
    assert w.adapter_panel.attach_btn.isEnabled()

    w.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, w)
    w.attach_adapter(str(llama_adapters["beta"]))
    idle(qtbot, w)
    state = w.session.state()
    assert [a[0] for a in state.adapters] == ["adapter-alpha", "adapter-beta"]
    assert all(size > 0 for _, _, size in state.adapters)
    assert w.adapter_panel.active_row() == "adapter-beta"
    assert w.adapter_panel.tree.topLevelItem(1).text(2).endswith("KiB")  # each adapter's own memory

    w.adapter_panel.select("adapter-alpha")
    w.adapter_panel.activate_selected()
    idle(qtbot, w)
    assert w.session.active_adapter == "adapter-alpha" and w.adapter_panel.active_row() == "adapter-alpha"
    qtbot.waitUntil(lambda: w.adapter_panel.inspection is not None, timeout=TIMEOUT)
    assert w.adapter_panel.inspector.fields["rank r"].text() == "4"
    assert "% of base" in w.adapter_panel.inspector.fields["params"].text()
    assert w.adapter_panel.inspector.chart_values[0] == ["0", "1"]  # one bar per layer
    # a filled-in inspector scrolls instead of making the window taller (a 768-pixel laptop screen), and a
    # job's progress bar keeps its place while hidden: a job starting or ending does not re-lay out the window
    assert w.minimumSizeHint().height() <= 680
    assert w.adapter_panel.progress.sizePolicy().retainSizeWhenHidden()
    assert w.job_status.progress.sizePolicy().retainSizeWhenHidden()

    w.adapter_panel.disable_all()
    idle(qtbot, w)
    assert w.session.active_adapter is None and w.adapter_panel.active_row() == BASE_ROW

    w.adapter_panel.detach("adapter-beta")
    idle(qtbot, w)
    assert [a[0] for a in w.session.state().adapters] == ["adapter-alpha"]
    assert "came back" in w.memory_panel.release_label.text()

    w.adapter_panel.try_it.prompt_edit.setText("hello")
    w.adapter_panel.generate()
    idle(qtbot, w)
    assert "tokens" in w.adapter_panel.message.text()

    w.adapter_panel.confirm_unload = lambda names: True  # the question "Unload all" asks, answered
    w.adapter_panel.unload_all()
    idle(qtbot, w)
    assert w.session.state().adapters == () and w.session.loaded
    marks = [m for _, m in w.memory_panel.markers]
    assert marks[:3] == ["loaded tiny-llama (float32)", "attached adapter-alpha", "attached adapter-beta"]
    assert "unloaded all adapters" in marks
    assert str(tiny_llama) in w.settings.recent_bases()
    assert str(llama_adapters["alpha"]) in w.settings.recent_adapters()


def test_cancel_a_load(qtbot, window, tiny_llama):
    w = window
    w.model_panel.set_source(str(tiny_llama))
    w.model_panel.load()
    assert w.open_base(str(tiny_llama)) is None  # a second model job is refused, with the reason shown
    assert "busy: loading tiny-llama" in w.job_status.label.text()
    w.model_panel.cancel_load()  # before the worker reaches its first safe point: deterministic
    idle(qtbot, w)
    assert not w.session.loaded
    assert "cancelled" in w.model_panel.message.text()
    assert "cancelled" in w.log_panel.contents()
    assert w.model_panel.load_btn.isEnabled()


def test_wrong_adapter_names_the_module_in_the_window(qtbot, window, tiny_llama, wide_adapter):
    w = window
    w.open_base(str(tiny_llama))
    idle(qtbot, w)
    w.attach_adapter(str(wide_adapter))
    idle(qtbot, w)
    text = w.adapter_panel.message.text()
    assert "model.layers.0.self_attn" in text and "64" in text and "32" in text
    assert w.adapter_panel.message.kind == "error"
    assert "model.layers.0.self_attn" in w.job_status.label.text()
    assert "Traceback" not in w.log_panel.contents()  # a user error is one line, even in the log
    assert w.session.state().adapters == ()


@pytest.mark.parametrize("answer", [True, False])
def test_added_tokens_adapter_offers_to_resize(qtbot, window, tiny_llama, added_tokens_adapter, answer):
    w = window
    asked = []
    w.adapter_panel.confirm_resize = lambda mismatch: asked.append(mismatch.adapter_vocab) or answer
    w.open_base(str(tiny_llama))
    idle(qtbot, w)
    w.attach_adapter(str(added_tokens_adapter))
    qtbot.waitUntil(lambda: bool(asked) and w.runner.is_idle(), timeout=TIMEOUT)
    idle(qtbot, w)
    assert asked == [330]
    state = w.session.state()
    if answer:
        assert [a[0] for a in state.adapters] == ["trap-added-tokens"]
        assert w.session.base_model().get_input_embeddings().weight.shape[0] == 330
    else:
        assert state.adapters == () and "not attached" in w.adapter_panel.message.text()


def test_bad_model_path_says_so(qtbot, window, tmp_path):
    w = window
    w.open_base(str(tmp_path / "nope"))
    idle(qtbot, w)
    assert "does not exist" in w.model_panel.message.text()


def test_memory_monitor_shows_two_fake_gpus(qtbot, tmp_path, data_dir):
    w = make_window(qtbot, tmp_path, MemorySampler(FakeNvml()))
    try:
        qtbot.waitUntil(lambda: len(w.memory_panel.samples) >= 3 and w.memory_panel.plot is not None, timeout=TIMEOUT)
        qtbot.waitUntil(lambda: "gpu1" in w.memory_panel.curve_names(), timeout=TIMEOUT)
        labels = [label.text() for label in w.memory_panel.gpu_labels]
        assert len(labels) == 2 and "Fake A100" in labels[0] and "Fake H100" in labels[1]
        assert "42% busy" in labels[1]
        assert {"rss", "ram", "gpu0", "gpu1"} <= set(w.memory_panel.curve_names())
        assert not w.memory_panel.no_gpu_label.isVisible()
        devices = [w.model_panel.device_combo.itemText(i) for i in range(w.model_panel.device_combo.count())]
        assert devices == ["cpu", "cuda:0", "cuda:1", "auto"]
    finally:
        w.shutdown()


def test_limits_per_device_place_the_layers_and_the_dock_says_where(qtbot, window, tiny_llama, llama_adapters):
    w = window
    w.model_panel.set_source(str(tiny_llama))
    w.model_panel.max_memory_edit.setText("cpu=lots")
    qtbot.waitUntil(lambda: "is not a size" in w.model_panel.verdict_label.text(), timeout=TIMEOUT)
    w.model_panel.max_memory_edit.setText("cpu=140KB")  # the embedding fits, the rest goes to disk
    qtbot.waitUntil(lambda: "placed:" in w.model_panel.detail_label.text(), timeout=TIMEOUT)
    assert "cpu ≈" in w.model_panel.detail_label.text() and "disk ≈" in w.model_panel.detail_label.text()
    w.model_panel.load()
    idle(qtbot, w)
    assert dict(w.session.state().placement).keys() == {"cpu", "disk"}
    assert "placed: cpu:" in w.model_panel.loaded_label.text()
    w.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, w)
    assert w.session.active_adapter == "adapter-alpha"


def test_train_quantize_base_follows_each_load(qtbot, window, gguf_llama):
    w = window
    w.model_panel.set_source(str(gguf_llama))
    w.model_panel.quantize_combo.setCurrentIndex(w.model_panel.quantize_combo.findData("nf4"))
    w.model_panel.load()
    idle(qtbot, w)
    assert w.train_panel.form.quantize.currentData() == "nf4"
    w.train_panel.form.quantize.setCurrentIndex(0)  # the user's choice stays until the next load
    w.model_panel.quantize_combo.setCurrentIndex(0)
    w.model_panel.load()
    idle(qtbot, w)
    assert w.train_panel.form.quantize.currentData() is None


def test_no_gpu_is_said_and_ram_still_drawn(qtbot, window):
    qtbot.waitUntil(lambda: len(window.memory_panel.samples) >= 2, timeout=TIMEOUT)
    assert "no NVIDIA GPU found" in window.memory_panel.no_gpu_label.text()
    assert "This process" in window.memory_panel.ram_label.text()


def test_drop_a_model_and_an_adapter_folder(qtbot, window, tiny_llama, llama_adapters):
    assert drop_kind(Path(tiny_llama)) == "base" and drop_kind(Path(llama_adapters["alpha"])) == "adapter"
    window.handle_drop([Path(llama_adapters["alpha"]), Path(tiny_llama)])
    qtbot.waitUntil(lambda: len(window.session.state().adapters) == 1 and window.runner.is_idle(), timeout=TIMEOUT)
    assert window.session.active_adapter == "adapter-alpha"


def test_tabs_and_settings_roundtrip(qtbot, tmp_path, data_dir):
    w = make_window(qtbot, tmp_path)
    titles = [w.tabs.tabText(i) for i in range(w.tabs.count())]
    assert titles == ["Adapters", "Compare", "Evaluate", "Reduce", "Merge", "Train"]
    w.log_dock.hide()
    w.close()  # saves geometry and layout, stops workers
    w2 = make_window(qtbot, tmp_path)
    try:
        assert w2.settings.window_geometry() is not None
        assert w2.log_dock.isHidden() and not w2.memory_dock.isHidden()  # panel layout came back
    finally:
        w2.shutdown()


def test_recent_entries_of_one_name_say_their_folders():
    from lora_studio.gui.window.menus import recent_label

    among = ["/a/pirate", "/b/pirate", "/c/sql"]
    assert [recent_label(p, among) for p in among] == ["pirate — /a", "pirate — /b", "sql"]
