"""The Merge tab's combinations: typed weights, a type that fits the ticked adapters, Save as adapter, the model card
shown inside the app (real window, real runner, tiny models)."""

from __future__ import annotations

import json

import factories
import pytest
from PySide6.QtCore import Qt
from window_helpers import idle
from window_helpers import merge_panel_with as loaded
from window_helpers import plan_settled as planned

from lora_studio.gui.tabs.merge.parts import AdapterRow
from lora_studio.gui.tabs.merge.result import card_markdown

TIMEOUT = 30_000


@pytest.fixture(scope="module")
def gamma_adapter(models_dir, tiny_llama):
    """r=4 like alpha: linear works for alpha + gamma."""
    return factories.make_adapter(tiny_llama, models_dir / "comb-gamma", seed=61, target_modules=("q_proj", "o_proj"))


def test_spin_box_and_slider_stay_in_sync(qtbot, llama_adapters):
    row = AdapterRow("alpha", str(llama_adapters["alpha"]), True)
    for w in row.widgets():
        qtbot.addWidget(w)
    moved = []
    row.slider.valueChanged.connect(moved.append)
    row.spin.setValue(0.37)  # typed
    assert row.slider.value() == pytest.approx(0.37) and row.weight == pytest.approx(0.37)
    row.slider.setValue(1.25)  # dragged
    assert row.spin.value() == pytest.approx(1.25) and row.spin.decimals() == 2
    assert moved == [pytest.approx(0.37), pytest.approx(1.25)]  # one change each way, no echo
    row.spin.lineEdit().selectAll()  # typed with the keyboard: one change when it is entered
    qtbot.keyClicks(row.spin, "0.75")
    qtbot.keyClick(row.spin, Qt.Key.Key_Return)
    assert row.spin.value() == pytest.approx(0.75) and row.weight == pytest.approx(0.75)
    assert moved[2:] == [pytest.approx(0.75)]
    row.spin.lineEdit().selectAll()
    qtbot.keyClicks(row.spin, "5")  # outside 0–2: the box does not take it
    qtbot.keyClick(row.spin, Qt.Key.Key_Return)
    assert row.weight == pytest.approx(0.75)
    assert row.rank_label.text() == "r=4"


def test_type_follows_the_ticked_adapters(qtbot, window, tiny_llama, llama_adapters, gamma_adapter, tmp_path):
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"], llama_adapters["beta"], gamma_adapter)
    alpha, beta, gamma = panel.rows
    assert [r.rank_label.text() for r in panel.rows] == ["r=4", "r=8", "r=4"]
    alpha.check.setChecked(True)
    beta.check.setChecked(True)
    assert panel.adapters.combo_type.currentText() == "cat"  # the default: exact, any ranks
    assert "rank 12" in panel.adapters.mode_label.text()
    beta.check.setChecked(False)
    gamma.check.setChecked(True)
    panel.adapters.combo_type.setCurrentText("linear")  # the user's choice, fine for r=4 + r=4
    panel.output.out_edit.setText(str(tmp_path / "o"))
    planned(qtbot, panel)
    assert panel.run_row.merge_btn.isEnabled(), panel.run_row.reason_label.text()
    beta.check.setChecked(True)  # now r=4, r=8, r=4: linear would fail; svd keeps the rank
    assert panel.adapters.combo_type.currentText() == "svd"
    note = panel.adapters.mode_label.text()
    assert "switched from linear to svd" in note and "adapter-beta r=8" in note and "rank 8" in note
    planned(qtbot, panel)
    assert panel.run_row.merge_btn.isEnabled(), panel.run_row.reason_label.text()
    gamma.check.setChecked(False)
    beta.check.setChecked(False)
    gamma.check.setChecked(True)  # equal ranks again: svd still works, so the picker leaves it
    assert panel.adapters.combo_type.currentText() == "svd"


def test_save_as_adapter_writes_a_peft_folder(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"], llama_adapters["beta"])
    for row in panel.rows:
        row.check.setChecked(True)
    panel.rows[1].spin.setValue(0.25)
    planned(qtbot, panel)
    assert panel.adapters.save_adapter_btn.isEnabled(), panel.adapters.save_adapter_btn.toolTip()
    out = tmp_path / "mix-adapter"
    asked = []
    panel.ask_adapter_folder = lambda start: asked.append(start) or out
    before = w.session.state()
    panel.adapters.save_adapter_btn.click()
    idle(qtbot, w)
    assert asked and asked[0].name == "mix-cat"
    assert panel.message.kind == "ok" and "rank 12" in panel.message.text() and str(out) in panel.message.text()
    assert w.session.state() == before  # nothing attached, nothing left behind
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 12
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(out))  # loads in PEFT

    answers = []
    panel.confirm_overwrite = lambda path: answers.append(path) or False
    panel.adapters.save_adapter_btn.click()  # the folder exists: asked, kept
    assert answers == [out] and "nothing was written" in panel.message.text() and w.runner.is_idle()


def test_model_card_shown_in_the_app_without_a_launcher(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    w = window
    panel = loaded(qtbot, w, tiny_llama, llama_adapters["alpha"])
    out = tmp_path / "merged"
    panel.output.out_edit.setText(str(out))
    panel.output.verify_check.setChecked(False)
    planned(qtbot, panel)
    panel.start_merge()
    idle(qtbot, w)
    assert panel.result is not None, panel.message.text()
    panel.open_url = lambda url: False  # what QDesktopServices.openUrl says with no desktop launcher
    panel.result_box.card_btn.click()
    dialog = panel.card_dialog
    assert dialog is not None and dialog.isVisible() and dialog.browser.isReadOnly()
    shown = dialog.browser.toPlainText()
    assert "library_name: transformers" in shown and "Provenance" in shown and "---" not in shown.splitlines()[0]
    assert dialog.path == out / "README.md"
    panel.open_folder()
    assert str(out) in panel.message.text()
    assert card_markdown("---\na: 1\n---\n# T\n") == "```yaml\na: 1\n```\n\n# T\n"
