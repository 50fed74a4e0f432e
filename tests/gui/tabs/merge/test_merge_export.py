"""The Merge tab's GGUF formats through the window's real runner: the file verified in llama.cpp, its badge and
serving commands; the adapter-only type list; cancel."""

from __future__ import annotations

from pathlib import Path

import pytest
from window_helpers import idle
from window_helpers import merge_panel_with as loaded
from window_helpers import plan_settled as planned

pytest.importorskip("llama_cpp", reason="llama.cpp's binding is installed by `make test`")

from lora_studio.core.export.verify import RUNTIME_STAGE


def choose_format(panel, fmt: str) -> None:
    panel.output.format_combo.setCurrentIndex(panel.output.format_combo.findData(fmt))


def test_export_a_merged_gguf_verified_in_llama_cpp(qtbot, window, gguf_llama, gguf_llama_adapters, tmp_path):
    w = window
    panel = loaded(qtbot, w, gguf_llama, gguf_llama_adapters["alpha"])
    choose_format(panel, "gguf")
    assert panel.run_row.merge_btn.text() == "Export GGUF"
    # a name that says what it holds, and follows the type
    assert panel.output.out_edit.text().endswith("gguf-llama-gguf-adapter-alpha.q8_0.gguf")
    assert not panel.output.dtype_combo.isVisible() and panel.output.gguf_type_combo.isVisibleTo(panel)
    combo = panel.output.gguf_type_combo
    combo.setCurrentIndex(combo.findData("q4_k_m"))
    assert panel.output.out_edit.text().endswith("gguf-llama-gguf-adapter-alpha.q4_k_m.gguf")
    combo.setCurrentIndex(combo.findData("q8_0"))
    out = tmp_path / "alpha.q8_0.gguf"
    panel.output.out_edit.setText(str(out))
    planned(qtbot, panel)
    assert panel.run_row.merge_btn.isEnabled(), panel.run_row.reason_label.text()
    assert not panel.plan_table.isVisible() and "q8_0 GGUF of about" in panel.export_plan_label.text()
    job = panel.start_merge()
    assert job is not None and panel.run_row.cancel_btn.isEnabled()
    idle(qtbot, w)
    assert job.state == "finished", panel.message.text()
    assert out.is_file() and (tmp_path / "alpha.q8_0.gguf.serve" / "Modelfile").is_file()
    assert panel.result_box.badge.text() in ("✔ verified", "⚠ check"), panel.result_box.numbers.text()
    assert "llama.cpp vs the adapter" in panel.result_box.numbers.text()
    assert "llama-server -m" in panel.result_box.saved_label.text()
    assert not panel.result_box.compare_merged_btn.isVisible()
    opened = []
    panel.open_url = opened.append
    panel.open_card()
    panel.open_folder()
    assert [Path(u.toLocalFile()) for u in opened] == [tmp_path]  # the folder in the file manager
    assert panel.card_dialog is not None and panel.card_dialog.path == tmp_path / "alpha.q8_0.gguf.serve" / "README.md"
    panel.card_dialog.external_btn.click()  # and the card in the desktop's app, when asked
    assert Path(opened[-1].toLocalFile()) == panel.card_dialog.path
    assert "exported" in [m for _, m in w.memory_panel.markers]


def test_adapter_only_offers_the_small_types_and_cancel_leaves_no_file(
    qtbot, window, gguf_llama, gguf_llama_adapters, tmp_path
):
    w = window
    panel = loaded(qtbot, w, gguf_llama, gguf_llama_adapters["alpha"])
    choose_format(panel, "gguf-lora")
    combo = panel.output.gguf_type_combo
    enabled = {combo.itemData(i) for i in range(combo.count()) if combo.model().item(i).isEnabled()}
    assert enabled == {"f32", "f16", "bf16", "q8_0"} and panel.output.gguf_type() == "f16"
    exports = tmp_path / "exports"
    panel.output.out_edit.setText(str(exports / "a.gguf"))
    planned(qtbot, panel)
    job = panel.start_merge()

    def on_progress(p):
        if p.message == RUNTIME_STAGE:  # in the worker process, the file written beside its name
            panel.run_row.cancel_btn.click()

    job.progressed.connect(on_progress)
    idle(qtbot, w)
    assert job.state == "cancelled" and list(exports.iterdir()) == []
    assert "no file was written" in panel.message.text()


def test_a_gguf_needs_a_gguf_name_and_one_adapter(qtbot, window, gguf_llama, gguf_llama_adapters, tmp_path):
    w = window
    panel = loaded(qtbot, w, gguf_llama, gguf_llama_adapters["alpha"], gguf_llama_adapters["beta"])
    choose_format(panel, "gguf")
    panel.output.out_edit.setText(str(tmp_path / "folder"))
    planned(qtbot, panel)
    assert not panel.run_row.merge_btn.isEnabled() and "does not end in .gguf" in panel.run_row.reason_label.text()
    for row in panel.rows:
        row.check.setChecked(True)
    panel.output.out_edit.setText(str(tmp_path / "m.gguf"))
    planned(qtbot, panel)
    assert "takes one adapter" in panel.run_row.reason_label.text()
    choose_format(panel, "hf")
    assert panel.run_row.merge_btn.text() == "Merge && save" and not panel.output.out_edit.text().endswith(".gguf")


def test_install_llama_cpp_runs_in_the_background_and_hides_the_button(
    qtbot, window, gguf_llama, gguf_llama_adapters, monkeypatch
):
    """The pip run itself is replaced by a child that prints pip's lines (no network in tests)."""
    import sys

    from lora_studio.core.export import runtime
    from lora_studio.gui.tabs.merge import panel as merge_panel_mod

    installed: list[str] = []
    fake_pip = "import time\nfor line in ('Collecting llama-cpp-python', 'Building wheel for llama-cpp-python'):\n"
    fake_pip += "    print(line, flush=True); time.sleep(0.3)\nprint('Installing collected packages')\n"
    monkeypatch.setattr(runtime, "install_command", lambda: [sys.executable, "-c", fake_pip])
    monkeypatch.setattr(runtime._restart, "needed", False)  # put back after the test: it sets it
    monkeypatch.setattr(runtime, "llama_cpp_version", lambda: "0.3.36")
    monkeypatch.setattr(merge_panel_mod, "llama_cpp_version", lambda: installed[0] if installed else None)
    w = window
    panel = loaded(qtbot, w, gguf_llama, gguf_llama_adapters["alpha"])
    choose_format(panel, "gguf")
    assert panel.output.install_btn.isVisibleTo(panel)
    messages = []
    job = panel.install_runtime()
    assert job is not None and not panel.output.install_btn.isEnabled()
    job.progressed.connect(lambda p: messages.append(p.message))
    assert w.runner.busy_reason == ""  # a side job: the session stays usable
    qtbot.waitUntil(lambda: job.done, timeout=20_000)
    installed.append("0.3.36")
    panel.update_install_button()
    assert job.state == "finished" and "0.3.36 is installed" in panel.message.text()
    # this process imported gguf before the install: the converter waits for a restart
    assert "restart LoRA Studio" in panel.message.text() and runtime.restart_needed()
    assert any("building llama.cpp from source" in m for m in messages)
    assert not panel.output.install_btn.isVisibleTo(panel)


def test_an_adapter_only_result_writes_the_base_gguf_its_commands_name(
    qtbot, window, gguf_llama, gguf_llama_adapters, tmp_path
):
    """The serving notes of an adapter-only file name an f16 base GGUF beside it: one button writes it (no CLI)."""
    w = window
    panel = loaded(qtbot, w, gguf_llama, gguf_llama_adapters["alpha"])
    choose_format(panel, "gguf-lora")
    panel.output.verify_check.setChecked(False)
    out = tmp_path / "alpha.lora-f16.gguf"
    panel.output.out_edit.setText(str(out))
    planned(qtbot, panel)
    job = panel.start_merge()
    idle(qtbot, w)
    assert job.state == "finished", panel.message.text()
    base = panel.result.base_to_write
    assert base == tmp_path / "gguf-llama.f16.gguf" and not base.exists()
    assert panel.result_box.write_base_btn.isVisibleTo(panel)
    assert panel.output.out_edit.text() == str(out)  # the user's own name stays
    panel.result_box.write_base_btn.click()
    idle(qtbot, w)
    assert base.is_file() and not panel.result_box.write_base_btn.isVisibleTo(panel)
    assert "the base GGUF saved" in panel.message.text() and panel.result.out == out  # the adapter's result stays
    assert str(base) in panel.result_box.saved_label.text()  # the commands it serves with name that file
    assert "the base as a GGUF, once" not in panel.result_box.saved_label.text()  # done: not asked again
    assert w.model_panel.saved_model_folders == []  # an adapter-only file is not a model to load
