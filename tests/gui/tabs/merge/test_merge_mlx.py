"""The Merge tab's mlx-lm format through the window's real runner: the adapter folder written, checked in mlx-lm,
its badge and commands; the folder attached back as an adapter."""

from __future__ import annotations

from window_helpers import idle
from window_helpers import merge_panel_with as loaded
from window_helpers import plan_settled as planned


def test_an_adapter_exported_for_mlx_lm_is_checked_there_and_attaches_back(
    qtbot, window, tiny_llama, llama_adapters, tmp_path, data_dir
):
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"])
    combo = panel.output.format_combo
    combo.setCurrentIndex(combo.findData("mlx"))
    assert panel.run_row.merge_btn.text() == "Export for mlx-lm"
    assert panel.output.out_edit.text().endswith("tiny-llama-adapter-alpha-mlx")  # a folder, named for what it holds
    assert not panel.output.gguf_type_combo.isVisibleTo(panel) and not panel.output.dtype_combo.isVisibleTo(panel)
    out = tmp_path / "alpha-mlx"
    panel.output.out_edit.setText(str(out))
    planned(qtbot, panel)
    assert panel.run_row.merge_btn.isEnabled(), panel.run_row.reason_label.text()
    assert "mlx-lm adapter folder" in panel.export_plan_label.text()
    job = panel.start_merge()
    assert job is not None
    idle(qtbot, w)
    assert job.state == "finished", panel.message.text()
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert panel.result_box.badge.text() == "✔ verified", panel.result_box.numbers.text()
    assert panel.result_box.numbers.text().startswith("mlx-lm vs the adapter: greedy agreement 100%")
    assert f"--adapter-path {out}" in panel.result_box.saved_label.text()
    assert w.model_panel.saved_model_folders == []  # an adapter folder is not a model to load
    # back: the mlx-lm folder attaches as an adapter (converted to PEFT's format once, in LoRA Studio's data folder)
    w.attach_adapter(str(out))
    idle(qtbot, w)
    assert "alpha-mlx" in [name for name, *_ in w.session.state().adapters]
    assert "converted from mlx-lm's format" in w.adapter_panel.message.text()  # and where the PEFT copy is
    # and saved where the user chooses as a PEFT folder, converted from the mlx-lm folder it came from
    for row in panel.rows:
        row.check.setChecked(row.name == "alpha-mlx")
    combo.setCurrentIndex(combo.findData("peft"))
    assert panel.run_row.merge_btn.text() == "Save as PEFT"
    saved = tmp_path / "alpha-as-peft"
    panel.output.out_edit.setText(str(saved))
    planned(qtbot, panel)
    assert panel.run_row.merge_btn.isEnabled(), panel.run_row.reason_label.text()
    job = panel.start_merge()
    idle(qtbot, w)
    assert job.state == "finished", panel.message.text()
    assert (saved / "adapter_model.safetensors").is_file() and panel.result_box.badge.text() == "✔ verified"
    # a PEFT adapter that did not come from mlx-lm is refused before anything is written
    for row in panel.rows:
        row.check.setChecked(row.name != "alpha-mlx")
    planned(qtbot, panel)
    assert "is not an mlx-lm adapter" in panel.run_row.reason_label.toolTip() + panel.run_row.reason_label.text()


def test_without_mlx_the_tab_offers_to_install_it(qtbot, window, tiny_llama, llama_adapters, monkeypatch):
    """The pip run itself is replaced by a child that prints pip's lines (no network in tests)."""
    import sys

    from lora_studio.core.export import mlx
    from lora_studio.gui.tabs.merge import panel as merge_panel_mod

    installed: list[str] = []
    fake_pip = "print('Collecting mlx-lm', flush=True)\nprint('Installing collected packages', flush=True)\n"
    monkeypatch.setattr(mlx, "install_command", lambda: [sys.executable, "-c", fake_pip])
    monkeypatch.setattr(mlx, "mlx_lm_version", lambda: "0.32.2")
    monkeypatch.setattr(merge_panel_mod, "mlx_lm_version", lambda: installed[0] if installed else None)
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"])
    combo = panel.output.format_combo
    combo.setCurrentIndex(combo.findData("mlx"))
    button = panel.output.install_btn
    combo.setCurrentIndex(combo.findData("peft"))  # checked in mlx-lm too: not llama.cpp's button
    assert button.isVisibleTo(panel) and button.text() == "Install mlx-lm…"
    combo.setCurrentIndex(combo.findData("mlx"))
    assert button.isVisibleTo(panel) and button.text() == "Install mlx-lm…"
    job = panel.install_runtime()
    assert job is not None and w.runner.busy_reason == ""  # a side job: the session stays usable
    qtbot.waitUntil(lambda: job.done, timeout=20_000)
    installed.append("0.32.2")
    panel.update_install_button()
    assert job.state == "finished" and "mlx-lm 0.32.2 is installed" in panel.message.text()
    assert not button.isVisibleTo(panel)
    combo.setCurrentIndex(combo.findData("hf"))
    assert not button.isVisibleTo(panel)
