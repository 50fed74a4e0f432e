"""Compare tab flows (issue 16, item 8): merged vs adapter, Run all prompts, the KL legend and hover, keys, layout."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QApplication
from window_helpers import idle, make_window

from lora_studio.core.compare import Variant, compare
from lora_studio.core.generation.generate import GenerationSettings
from lora_studio.gui.tabs.compare.columns import COLUMN_MIN_WIDTH, KLLegend, kl_color, kl_position
from lora_studio.gui.tabs.compare.stream import display_text

PROMPTS = ["The quick brown fox", "Paris is", "one two three"]


@pytest.fixture
def window(qtbot, tmp_path, data_dir, tiny_llama, llama_adapters):
    w = make_window(qtbot, tmp_path, sample_interval_s=0.2)
    w.open_base(str(tiny_llama))
    idle(qtbot, w)
    for path in llama_adapters.values():
        w.attach_adapter(str(path))
        idle(qtbot, w)
    w.tabs.setCurrentWidget(w.compare_panel)
    yield w
    w.shutdown()


def ran(qtbot, window, start):
    job = start()
    assert job is not None, window.compare_panel.message.text()
    idle(qtbot, window)
    assert job.state == "finished", window.compare_panel.message.text()
    return window.compare_panel.outcome


def test_compare_merged_vs_adapter_ticks_exactly_those_two(qtbot, window, tmp_path):
    """Merge tab → 'Compare merged vs adapter': the merged column and its adapter, the adapter as the reference."""
    merge = window.merge_panel
    window.tabs.setCurrentWidget(merge)
    qtbot.waitUntil(lambda: [r.name for r in merge.rows] == ["adapter-alpha", "adapter-beta"], timeout=30_000)
    for row in merge.rows:
        row.check.setChecked(row.name == "adapter-beta")
    merge.output.out_edit.setText(str(tmp_path / "beta-merged"))
    qtbot.waitUntil(
        lambda: not merge.plan_pending and window.runner.is_idle() and not merge.start_reason(), timeout=30_000
    )
    assert merge.start_merge() is not None
    idle(qtbot, window)
    assert merge.result is not None, merge.message.text()

    panel = window.compare_panel
    assert [n for n, _ in panel.ticked()] == ["base", "adapter-alpha", "adapter-beta"]
    merge.result_box.compare_merged_btn.click()
    idle(qtbot, window)
    assert window.tabs.currentWidget() is panel
    assert panel.ticked() == [("adapter-beta", "adapter"), ("beta-merged", "merged")]
    assert panel.variants.reference_combo.currentText() == "adapter-beta"
    assert [c.name for c in panel.columns] == ["adapter-beta", "beta-merged"]
    assert panel.message.kind == "ok" and "against adapter-beta" in panel.message.text()

    # a second click reuses the folder already loaded beside the session (no second copy, still exactly two)
    panel.set_ticked(["base"])
    merge.result_box.compare_merged_btn.click()
    idle(qtbot, window)
    assert list(panel.merged) == ["beta-merged"]
    assert [n for n, _ in panel.ticked()] == ["adapter-beta", "beta-merged"]
    assert panel.variants.reference_combo.currentText() == "adapter-beta"

    panel.prompt_box.edit.setPlainText("hello world")
    panel.decoding.max_tokens.setValue(6)
    outcome = ran(qtbot, window, panel.run)
    report = outcome.result.prompts[0].divergence
    assert report.reference == "adapter-beta"
    assert report.column("beta-merged").scores.mean_kl < 1e-3  # the merge of beta behaves as beta
    assert "reference" in panel.column("adapter-beta").header.text()


def test_merged_folder_whose_adapter_is_gone_is_compared_with_the_base(qtbot, window, tiny_llama):
    panel = window.compare_panel
    panel.add_merged_variant(str(tiny_llama), against=("no-such-adapter",))
    idle(qtbot, window)
    assert [n for n, _ in panel.ticked()] == ["base", "tiny-llama"]
    assert panel.variants.reference_combo.currentText() == "base"
    assert "no-such-adapter no longer attached" in panel.message.text()


def test_run_all_prompts_shows_each_prompt_in_the_prompt_bar(qtbot, window):
    panel = window.compare_panel
    assert not panel.run_bar.run_all_btn.isEnabled() and "load a prompt list" in panel.run_bar.run_all_btn.toolTip()
    assert panel.run_all() is None and panel.message.kind == "error"
    panel.set_prompts(PROMPTS)
    assert panel.run_bar.run_all_btn.isEnabled()
    panel.decoding.max_tokens.setValue(8)
    job = panel.run_all()
    assert job is not None and panel.results.prompt_tabs.isVisibleTo(panel) and panel.results.prompt_tabs.count() == 3
    panel.results.show_prompt(1)  # switching while it streams is allowed
    idle(qtbot, window)
    outcome = panel.outcome
    assert [p.prompt for p in outcome.result.prompts] == PROMPTS
    assert panel.message.kind == "ok" and "on 3 prompts" in panel.message.text()

    variants = [Variant.base(), Variant.of_adapter("adapter-alpha"), Variant.of_adapter("adapter-beta")]
    direct = compare(window.session, variants, PROMPTS, GenerationSettings(max_new_tokens=8))
    assert panel.results.shown_prompt == 1 and "prompt 2/3" in panel.run_bar.note.text()
    for index in (1, 0, 2):
        panel.results.prompt_tabs.setCurrentIndex(index)
        assert panel.results.shown_prompt == index
        for column in panel.columns:
            expected = direct.prompts[index].output(column.name)
            assert column.text.toPlainText() == display_text(expected.text)
            assert column.streamed == expected.text  # what streamed for this prompt, exactly
            assert column.tokens == len(expected.token_ids)
            assert len(column.strip.kl) == len(direct.prompts[index].output("base").token_ids)
        assert f"prompt {index + 1}/3" in panel.run_bar.note.text()
        assert PROMPTS[index] in panel.results.prompt_tabs.tabToolTip(index)

    # ticking another set of variants starts fresh columns: the old prompt bar goes
    panel.set_ticked(["base", "adapter-alpha"])
    assert not panel.results.prompt_tabs.isVisibleTo(panel) and panel.results.run_prompts == []
    panel.run_all()
    idle(qtbot, window)
    assert panel.results.prompt_tabs.count() == 3 and [c.name for c in panel.columns] == ["base", "adapter-alpha"]
    # a one-prompt Run afterwards hides the prompt bar again
    ran(qtbot, window, panel.run)
    assert not panel.results.prompt_tabs.isVisibleTo(panel) and len(panel.outcome.result.prompts) == 1


def test_run_all_names_the_bad_prompt(qtbot, window):
    panel = window.compare_panel
    panel.set_prompts(["fine", "   "])
    assert panel.run_all() is None and window.runner.is_idle()
    assert panel.message.kind == "error" and panel.message.text().startswith("prompt 2:")


def test_heat_strip_has_a_legend_and_hover_highlights_the_token(qtbot, window):
    panel = window.compare_panel
    assert panel.results.legend.isVisibleTo(panel)
    legend = panel.results.legend.findChild(KLLegend)
    image = legend.grab().toImage()
    middle = legend.height() // 2
    low = image.pixelColor(int(0.1 * legend.width()), middle)  # between the tick labels
    high = image.pixelColor(int(0.85 * legend.width()), middle)
    assert abs(low.red() - kl_color(0.1).red()) < 12 and low.green() > 200  # pale at the low end
    assert high.red() > 180 and high.green() < 90  # deep red at the high end
    assert kl_position(0.0) == 0.0 and kl_position(0.25) < kl_position(1.0) < kl_position(3.0) < 1.0

    panel.prompt_box.edit.setPlainText("The quick brown fox")
    panel.decoding.max_tokens.setValue(10)
    outcome = ran(qtbot, window, panel.run)
    cmp = outcome.result.prompts[0]
    base, alpha = panel.column("base"), panel.column("adapter-alpha")
    n = len(cmp.output("base").token_ids)
    assert n >= 3 and len(outcome.displays[0].token_spans) == n
    tokenizer = window.session.tokenizer
    ids = cmp.output("base").token_ids
    cell = max(1.0, alpha.strip.width() / n)
    qtbot.mouseMove(alpha.strip, QPoint(int(cell * 1.5), alpha.strip.height() // 2))  # over cell 1
    qtbot.waitUntil(lambda: alpha.strip.hover == 1, timeout=5_000)
    start, end = base.highlighted_span()
    shown = base.text.toPlainText()

    def decoded(count: int) -> str:  # a prefix ending inside a UTF-8 character shows without its half
        return display_text(tokenizer.decode(ids[:count], skip_special_tokens=True).rstrip("\ufffd"))

    assert shown[:start] == decoded(1) and shown[: max(end, start)].startswith(decoded(1))
    assert end == max(len(decoded(2)), start + 1) or end == len(shown)
    first = cmp.divergence.column("adapter-alpha").first_divergence
    assert (alpha.highlighted_span() is not None) == (first is None or first > 1)  # only where it holds the token
    alpha.strip.set_hover(None)  # the mouse leaves
    assert base.highlighted_span() is None and alpha.highlighted_span() is None
    # the orange divergence mark survives a hover (the highlight is an extra selection, not a format)
    offset = outcome.divergence_offsets["adapter-alpha"]
    if offset is not None and offset < len(alpha.text.toPlainText()):
        backgrounds = []
        it = alpha.text.document().lastBlock().begin()
        while not it.atEnd():
            backgrounds.append(it.fragment().charFormat().background().color().name())
            it += 1
        assert "#fde2c4" in backgrounds


def test_tab_leaves_the_prompt_box_and_ctrl_enter_runs(qtbot, window):
    panel = window.compare_panel
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=5_000)
    edit = panel.prompt_box.edit
    edit.setPlainText("hello world")
    edit.setFocus()
    qtbot.waitUntil(edit.hasFocus, timeout=5_000)
    qtbot.keyClick(edit, Qt.Key.Key_Tab)
    assert not edit.hasFocus() and "\t" not in edit.toPlainText()
    assert edit.tabChangesFocus()

    edit.setFocus()
    qtbot.waitUntil(edit.hasFocus, timeout=5_000)
    panel.decoding.max_tokens.setValue(4)
    qtbot.keyClick(edit, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert panel.job is not None  # Ctrl+Enter started the run
    idle(qtbot, window)
    assert panel.outcome is not None and "\n" not in edit.toPlainText()
    # keypad Enter too; and not from another tab (the shortcut belongs to the Compare panel)
    window.tabs.setCurrentWidget(window.adapter_panel)
    window.adapter_panel.setFocus()
    qtbot.keyClick(window.adapter_panel, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert panel.job is None


def test_four_columns_fit_a_1280_window_without_scrolling(qtbot, window, llama_adapters):
    """Base + three adapters, like the demo: four columns side by side at 1280×720, no horizontal scroll bar."""
    window.attach_adapter(str(llama_adapters["alpha"]))  # a second name for the same folder: a fourth variant
    idle(qtbot, window)
    panel = window.compare_panel
    window.resize(1280, 720)
    qtbot.waitUntil(lambda: window.width() == 1280, timeout=5_000)
    qtbot.wait(50)
    assert len(panel.columns) == 4, panel.ticked()
    QApplication.processEvents()
    assert not panel.results.columns_scroll.horizontalScrollBar().isVisible(), (
        panel.results.columns_scroll.viewport().width(),
        panel.results.column_splitter.minimumSizeHint().width(),
    )
    assert all(c.width() >= COLUMN_MIN_WIDTH for c in panel.columns)
    assert all(c.visibleRegion().boundingRect().width() >= COLUMN_MIN_WIDTH - 1 for c in panel.columns)
