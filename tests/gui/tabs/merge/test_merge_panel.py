"""The Merge tab through the window's real runner.

Plan, merge and verify, overwrite question, cancel, disk refusal, ties.
"""

from __future__ import annotations

import json
from pathlib import Path

import factories
import pytest
from window_helpers import idle
from window_helpers import merge_panel_with as loaded
from window_helpers import plan_settled as planned

from lora_studio.core.merge import plan as merge_core

TIMEOUT = 30_000


@pytest.fixture(scope="module")
def gamma_adapter(models_dir, tiny_llama):
    """Same rank as alpha (r=4), other targets: ties needs equal ranks."""
    return factories.make_adapter(tiny_llama, models_dir / "merge-gamma", seed=41, target_modules=("q_proj", "o_proj"))


def test_merge_one_adapter_verified(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"])
    assert w.tabs.tabText(w.tabs.indexOf(panel)) == "Merge"
    assert [r.checked for r in panel.rows] == [True]  # the only adapter is ticked: a plain merge
    assert not panel.adapters.combo_type.isEnabled() and not panel.adapters.density.isEnabled()
    assert panel.output.dtype_combo.currentText() == "float32"  # the base's dtype
    planned(qtbot, panel)
    # an output is suggested beside the base, named for what it holds
    assert panel.output.out_edit.text() == str(Path(tiny_llama).parent / "tiny-llama-adapter-alpha-merged")
    panel.output.out_edit.setText("")
    planned(qtbot, panel)
    assert not panel.run_row.merge_btn.isEnabled() and "output folder" in panel.run_row.reason_label.text()

    out = tmp_path / "out"
    panel.output.out_edit.setText(str(out))
    planned(qtbot, panel)
    assert panel.run_row.merge_btn.isEnabled(), panel.run_row.reason_label.text()
    assert panel.plan.engine == "streaming" and "auto → streaming" in panel.output.engine_note.text()
    assert panel.plan_table.cells["streaming"][1].text().endswith("iB")  # a predicted peak RAM per engine
    assert "✔" in panel.plan_table.disk_label.text()

    job = panel.start_merge()
    assert job is not None and panel.run_row.cancel_btn.isEnabled() and not panel.run_row.merge_btn.isEnabled()
    idle(qtbot, w)
    assert job.state == "finished", panel.message.text()
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "README.md" in names
    assert "adapter_config.json" not in names
    assert panel.result_box.badge.text() == "✔ verified" and panel.result_box.isVisible()
    assert (
        "max |Δlogit|" in panel.result_box.numbers.text() and "greedy agreement 100%" in panel.result_box.numbers.text()
    )
    assert "merged" in [m for _, m in w.memory_panel.markers]
    opened = []
    panel.open_url = opened.append
    panel.open_card()
    panel.open_folder()
    assert [Path(u.toLocalFile()) for u in opened] == [out]  # the card opens inside the app
    assert panel.card_dialog is not None and panel.card_dialog.path == out / "README.md"
    assert w.session.active_adapter == "adapter-alpha"  # the session is as it was


def test_existing_folder_and_no_keeps_it(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"])
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    asked = []
    panel.confirm_overwrite = lambda path: asked.append(path) or False
    panel.output.out_edit.setText(str(out))
    planned(qtbot, panel)
    assert panel.start_merge() is None
    assert asked == [out] and w.runner.is_idle() and panel.merge_job is None
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert "nothing was written" in panel.message.text()


def test_cancel_mid_merge_leaves_no_folder(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"])
    out = tmp_path / "cancelled"
    panel.output.out_edit.setText(str(out))
    planned(qtbot, panel)
    job = panel.start_merge()
    seen = []

    def on_progress(p):  # cancel as soon as the merge reports writing tensors
        seen.append(p)
        if p.unit == "bytes":
            panel.run_row.cancel_btn.click()

    job.progressed.connect(on_progress)
    idle(qtbot, w)
    assert job.state == "cancelled" and any(p.unit == "bytes" for p in seen)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # the temporary folder is gone too
    assert "cancelled" in panel.message.text() and panel.run_row.merge_btn.isEnabled()


def test_not_enough_disk_disables_merge(qtbot, window, tiny_llama, llama_adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_core.paths, "free_disk", lambda path: 1024)
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"])
    panel.output.out_edit.setText(str(tmp_path / "full"))
    planned(qtbot, panel)
    assert not panel.run_row.merge_btn.isEnabled()
    reason = panel.run_row.reason_label.text()
    assert "needs about" in reason and "free" in reason and panel.run_row.merge_btn.toolTip() == reason
    assert "✖" in panel.plan_table.disk_label.text()
    assert panel.start_merge() is None and w.runner.is_idle()


def test_ties_combination_of_two(qtbot, window, tiny_llama, llama_adapters, gamma_adapter, tmp_path):
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"], gamma_adapter)
    for row in panel.rows:
        row.check.setChecked(True)
    panel.rows[1].slider.setValue(0.5)
    panel.adapters.combo_type.setCurrentText("linear")
    assert (
        panel.adapters.combo_type.isEnabled() and not panel.adapters.density.isEnabled()
    )  # density only where it applies
    panel.adapters.combo_type.setCurrentText("ties")
    assert panel.adapters.density.isEnabled()
    panel.adapters.density.setValue(0.6)
    out = tmp_path / "ties"
    panel.output.out_edit.setText(str(out))
    planned(qtbot, panel)
    assert panel.plan.engine == "in-memory" and "streaming does not apply" in panel.output.engine_note.text()
    assert panel.adapters.preview_btn.isEnabled()

    job = panel.start_merge()
    idle(qtbot, w)
    assert job.state == "finished", panel.message.text()
    card = (out / "README.md").read_text()
    block = json.loads(card.split("```json", 1)[1].split("```", 1)[0])
    assert block["combination"] == "ties" and block["density"] == 0.6
    assert [a["weight"] for a in block["adapters"]] == [1.0, 0.5]
    assert panel.result_box.badge.text() in ("✔ verified", "⚠ check") and panel.result_box.numbers.text()
    assert [a[0] for a in w.session.state().adapters] == ["adapter-alpha", "merge-gamma"]  # no combination left behind

    # the Compare tab: preview the combination before saving, and the saved folder against the adapters
    panel.adapters.preview_btn.click()
    idle(qtbot, w)
    assert w.tabs.currentWidget() is w.compare_panel
    assert "mix-ties" in [a[0] for a in w.session.state().adapters]
    qtbot.waitUntil(lambda: [r.name for r in panel.rows][-1:] == ["mix-ties"], timeout=TIMEOUT)
    assert not panel.rows[-1].check.isEnabled()  # a preview combination has no folder to merge from
    w.tabs.setCurrentWidget(panel)
    assert panel.result_box.compare_merged_btn.isEnabled()
    panel.result_box.compare_merged_btn.click()
    idle(qtbot, w)
    assert "ties" in w.compare_panel.merged and w.tabs.currentWidget() is w.compare_panel


def test_bad_combination_is_one_line_and_no_job(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    """alpha (r=4) and beta (r=8): linear needs equal ranks; the plan refuses it in one line before any job."""
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"], llama_adapters["beta"])
    for row in panel.rows:
        row.check.setChecked(True)
    assert panel.adapters.combo_type.currentText() == "cat"  # the default works for any ranks
    panel.adapters.combo_type.setCurrentText("linear")
    panel.output.out_edit.setText(str(tmp_path / "bad"))
    planned(qtbot, panel)
    reason = panel.run_row.reason_label.text()
    assert "PEFT cannot combine these adapters with linear" in reason and "same rank" in reason
    assert "\n" not in reason and not panel.run_row.merge_btn.isEnabled() and not panel.adapters.preview_btn.isEnabled()
    assert not panel.adapters.save_adapter_btn.isEnabled()
    # one line, beside the combination type (the Merge button's tooltip says it too)
    assert "same rank" in panel.adapters.mode_label.text() and not panel.run_row.reason_label.isVisible()
    assert panel.run_row.merge_btn.toolTip() == reason
    assert panel.start_merge() is None and w.runner.is_idle() and panel.merge_job is None
    assert "PEFT cannot combine" in panel.message.text()
    assert "Traceback" not in w.log_panel.contents()
    assert not (tmp_path / "bad").exists()
    w.adapter_panel.detach("adapter-beta")  # the rows follow the session
    idle(qtbot, w)
    assert [r.name for r in panel.rows] == ["adapter-alpha"] and panel.rows[0].checked
    assert not panel.adapters.combo_type.isEnabled()


def test_a_base_saved_in_four_bits_asks_for_the_folder_it_was_quantised_from(
    qtbot, window, gguf_llama, gguf_llama_adapters, tmp_path
):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dependency")
    saved = factories.save_quantised(gguf_llama, tmp_path / "saved-nf4")
    panel = loaded(qtbot, window, saved, gguf_llama_adapters["alpha"])
    assert panel.output.form.isRowVisible(panel.output.full_precision_row)
    panel.output.out_edit.setText(str(tmp_path / "merged"))
    planned(qtbot, panel)
    assert not panel.run_row.merge_btn.isEnabled() and "16/32-bit folder" in panel.run_row.reason_label.text()
    panel.output.full_precision_edit.setText(str(gguf_llama))
    planned(qtbot, panel)
    assert panel.run_row.merge_btn.isEnabled(), panel.run_row.reason_label.text()
    panel.output.format_combo.setCurrentIndex(panel.output.format_combo.findData("gguf"))
    assert not panel.output.form.isRowVisible(panel.output.full_precision_row)


def test_the_suggested_output_follows_the_inputs_and_a_written_one_stays(
    qtbot, window, tiny_llama, llama_adapters, tmp_path
):
    panel = loaded(qtbot, window, tiny_llama, llama_adapters["alpha"], llama_adapters["beta"])
    for row in panel.rows:
        row.check.setChecked(row.name == "adapter-alpha")
    beside = Path(tiny_llama).parent
    assert panel.output.out_edit.text() == str(beside / "tiny-llama-adapter-alpha-merged")
    for row in panel.rows:
        row.check.setChecked(row.name == "adapter-beta")
    assert panel.output.out_edit.text() == str(beside / "tiny-llama-adapter-beta-merged")
    fmt = panel.output.format_combo
    fmt.setCurrentIndex(fmt.findData("gguf-lora"))
    assert panel.output.out_edit.text() == str(beside / "tiny-llama-adapter-beta.lora-f16.gguf")
    types = panel.output.gguf_type_combo
    types.setCurrentIndex(types.findData("f32"))
    assert panel.output.out_edit.text().endswith("tiny-llama-adapter-beta.lora-f32.gguf")  # not lora-f16
    fmt.setCurrentIndex(fmt.findData("hf"))
    assert panel.output.out_edit.text() == str(beside / "tiny-llama-adapter-beta-merged")  # not "….lora-f32"
    mine = tmp_path / "mine"
    panel.output.out_edit.setText(str(mine))
    for row in panel.rows:
        row.check.setChecked(row.name == "adapter-alpha")
    assert panel.output.out_edit.text() == str(mine)  # the user's own name stays


def test_a_suggested_output_moves_on_after_saving_and_the_model_is_listed(
    qtbot, window, tiny_llama, llama_adapters, tmp_path
):
    """Saved under the suggested name, the next suggestion is a free one, and the merged folder is among the
    machine's models in the Base model column; a desktop without a program to open it says where it is."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    panel = loaded(qtbot, window, base, llama_adapters["alpha"])
    first = tmp_path / "base-adapter-alpha-merged"
    assert panel.output.out_edit.text() == str(first)
    panel.output.verify_check.setChecked(False)
    planned(qtbot, panel)
    job = panel.start_merge()
    idle(qtbot, window)
    assert job.state == "finished", panel.message.text() and first.is_dir()
    assert panel.output.out_edit.text() == str(tmp_path / "base-adapter-alpha-merged-2")
    assert not panel.result_box.write_base_btn.isVisibleTo(panel)
    assert window.model_panel.saved_model_folders == [tmp_path]
    local = window.model_panel.local_list
    qtbot.waitUntil(
        lambda: str(first) in [local.item(i).data(256) for i in range(local.count())], timeout=TIMEOUT
    )  # Qt.UserRole
    panel.open_url = lambda url: False  # what QDesktopServices.openUrl says with no program for it
    panel.open_folder()
    assert "no program here opens" in panel.message.text() and str(tmp_path) in panel.message.text()
