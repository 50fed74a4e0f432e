"""The Compare tab through the window's real runner.

Columns, streamed text equal to core compare(), Stop, divergence.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import factories
import pytest
from window_helpers import idle
from window_helpers import make_window as shared_make_window

from lora_studio.core.compare import Variant, compare
from lora_studio.core.generation.generate import GenerationSettings
from lora_studio.gui.tabs.compare.columns import ColumnView, KLStrip
from lora_studio.gui.tabs.compare.stream import DeltaBuffer, display_text
from lora_studio.gui.window.main_window import MainWindow

TIMEOUT = 30_000


@pytest.fixture(scope="module")
def tiny_llama_long(tmp_path_factory):
    """tiny_llama's shapes with a long context, so a run can be long enough to Stop (the adapters still fit)."""
    return factories.make_llama(tmp_path_factory.mktemp("long") / "tiny-llama-long", max_position_embeddings=8192)


def make_window(qtbot, tmp_path) -> MainWindow:
    return shared_make_window(qtbot, tmp_path, sample_interval_s=0.2)


def loaded_window(qtbot, tmp_path, base, adapters):
    w = make_window(qtbot, tmp_path)
    w.open_base(str(base))
    idle(qtbot, w)
    for path in adapters:
        w.attach_adapter(str(path))
        idle(qtbot, w)
    return w


@pytest.fixture
def window(qtbot, tmp_path, data_dir, tiny_llama, llama_adapters):
    w = loaded_window(qtbot, tmp_path, tiny_llama, llama_adapters.values())
    w.tabs.setCurrentWidget(w.compare_panel)
    yield w
    w.shutdown()


def test_columns_follow_ticks_and_adapter_changes(qtbot, window):
    panel = window.compare_panel
    assert window.tabs.tabText(window.tabs.indexOf(panel)) == "Compare"
    assert [name for name, _ in panel.ticked()] == ["base", "adapter-alpha", "adapter-beta"]
    assert [c.name for c in panel.columns] == ["base", "adapter-alpha", "adapter-beta"]
    assert panel.variants.reference_combo.currentText() == "base"
    panel.set_ticked(["base", "adapter-beta"])
    assert [c.name for c in panel.columns] == ["base", "adapter-beta"]
    window.adapter_panel.detach("adapter-beta")  # the list follows the session
    idle(qtbot, window)
    assert [name for name, _ in panel.available_variants()] == ["base", "adapter-alpha"]
    assert [c.name for c in panel.columns] == ["base"]


def test_run_fills_every_column_with_core_compare_text(qtbot, window):
    panel = window.compare_panel
    panel.prompt_box.edit.setPlainText("The quick brown fox")
    panel.decoding.max_tokens.setValue(12)
    panel.run()
    assert panel.job is not None and not panel.run_bar.run_btn.isEnabled()
    idle(qtbot, window)
    outcome = panel.outcome
    assert outcome is not None
    assert "one mixed batch" in panel.run_bar.note.text()

    session = window.session
    variants = [Variant.base(), Variant.of_adapter("adapter-alpha"), Variant.of_adapter("adapter-beta")]
    direct = compare(session, variants, "The quick brown fox", GenerationSettings(max_new_tokens=12)).prompts[0]
    for column in panel.columns:
        expected = direct.output(column.name).text
        assert column.streamed == expected  # the stream alone built the text, exactly
        assert column.text.toPlainText() == display_text(expected)
        assert column.tokens == len(direct.output(column.name).token_ids)

    # divergence: a strip per column, summary numbers in the header, the reference scores 0 against itself
    report = outcome.result.prompts[0].divergence
    assert report.reference == "base"
    base, alpha = panel.column("base"), panel.column("adapter-alpha")
    assert isinstance(alpha.strip, KLStrip) and len(alpha.strip.kl) == len(direct.output("base").token_ids)
    assert base.strip.kl and max(base.strip.kl) == 0.0
    assert "mean KL" in alpha.header.text() and "agreement" in alpha.header.text()
    assert "reference" in base.header.text()
    assert alpha.strip.tooltip_for(0).startswith("token 0")
    first = report.column("adapter-alpha").first_divergence
    if first is not None:  # the highlight starts where the text first differs
        offset = outcome.divergence_offsets["adapter-alpha"]
        block = alpha.text.document().findBlock(offset)
        assert block.isValid()
    assert window.adapter_panel.state.active_adapter == session.active_adapter  # state restored


def test_empty_prompt_is_one_line_in_the_panel_and_no_job(qtbot, window):
    panel = window.compare_panel
    panel.prompt_box.edit.setPlainText("   \n ")
    assert panel.run() is None
    assert window.runner.is_idle()
    assert panel.message.kind == "error" and "prompt is empty" in panel.message.text()
    assert "\n" not in panel.message.text()


def test_stop_cancels_a_long_run_and_the_window_stays_usable(
    qtbot, tmp_path, data_dir, tiny_llama_long, llama_adapters
):
    w = loaded_window(qtbot, tmp_path, tiny_llama_long, [llama_adapters["alpha"]])
    try:
        panel = w.compare_panel
        panel.prompt_box.edit.setPlainText("hello world")
        panel.decoding.max_tokens.setValue(4000)
        panel.run()
        qtbot.waitUntil(lambda: all(c.tokens >= 3 for c in panel.columns), timeout=TIMEOUT)  # streaming, not stuck
        panel.stop()
        idle(qtbot, w)
        assert panel.job is None and panel.outcome is None
        assert panel.message.kind == "warn" and "stopped" in panel.message.text()
        assert all(c.tokens < 4000 for c in panel.columns)
        assert panel.run_bar.run_btn.isEnabled() and not panel.run_bar.stop_btn.isEnabled()
        # usable: another (short) run completes
        panel.decoding.max_tokens.setValue(4)
        panel.run()
        idle(qtbot, w)
        assert panel.outcome is not None and all(c.tokens >= 1 for c in panel.columns)
    finally:
        w.shutdown()


def test_combination_variant_is_added_ticked_and_shown_in_the_adapter_list(qtbot, window):
    panel = window.compare_panel
    panel.add_combination_variant("mix", {"adapter-alpha": 0.5, "adapter-beta": 0.5}, "cat", None)
    idle(qtbot, window)
    assert ("mix", "adapter") in panel.ticked()
    assert "mix" in [a[0] for a in window.adapter_panel.state.adapters]
    assert panel.message.kind == "ok"
    panel.add_combination_variant("mix", {"adapter-alpha": 1.0}, "linear", None)  # name taken: one line, no traceback
    idle(qtbot, window)
    assert panel.message.kind == "error" and "already attached" in panel.message.text()


def test_merged_folder_variant_and_prompts_file(qtbot, window, tiny_llama, tmp_path):
    panel = window.compare_panel
    panel.add_merged_variant(str(tiny_llama))  # the base itself is a valid "merged" folder for this base
    idle(qtbot, window)
    assert ("tiny-llama", "merged") in panel.ticked()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello world"}\n{"prompt": "Paris"}\n', "utf-8")
    panel.load_prompts_file(str(prompts))
    idle(qtbot, window)
    assert panel.prompt_box.select.isVisibleTo(panel) and panel.prompt_box.select.count() == 2
    assert panel.prompt_box.edit.toPlainText() == "hello world"
    panel.prompt_box.select.setCurrentIndex(1)
    assert panel.prompt_box.edit.toPlainText() == "Paris"
    panel.set_ticked(["base", "tiny-llama"])
    panel.decoding.max_tokens.setValue(6)
    panel.run()
    idle(qtbot, window)
    base, merged = panel.column("base"), panel.column("tiny-llama")
    assert merged.text.toPlainText() == base.text.toPlainText()  # same weights: identical columns
    assert merged.first_divergence is None and "identical" in merged.header.text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", "utf-8")
    panel.load_prompts_file(str(bad))
    idle(qtbot, window)
    assert panel.message.kind == "error" and "line 1" in panel.message.text()


def test_delta_buffer_groups_per_variant_in_order():
    from lora_studio.core.compare import TokenDelta

    buf = DeltaBuffer()
    for text, variant in (("a", "x"), ("b", "y"), ("c", "x")):
        buf.push(TokenDelta(0, variant, [1], text))
    assert buf.drain() == {"x": ("ac", 2), "y": ("b", 1)}
    assert buf.drain() == {}


def test_loss_plot_appears_for_an_adapter_with_a_loss_csv(qtbot, tmp_path, data_dir, tiny_llama, llama_adapters):
    with_log = tmp_path / "with-log"
    shutil.copytree(llama_adapters["alpha"], with_log)
    (with_log / "loss.csv").write_text("step,train_loss,val_loss\n0,3.0,\n1,2.5,2.8\n2,2.0,\n3,1.8,2.1\n", "utf-8")
    w = loaded_window(qtbot, tmp_path, tiny_llama, [with_log, llama_adapters["beta"]])
    try:
        ap = w.adapter_panel
        ap.select("with-log")
        qtbot.waitUntil(lambda: ap.inspection is not None and ap.inspection.name == "with-log", timeout=TIMEOUT)
        qtbot.waitUntil(
            lambda: ap.inspector.loss_chart is not None and ap.inspector.loss_box.isVisibleTo(ap), timeout=TIMEOUT
        )
        assert ap.inspector.loss_values == ([0.0, 1.0, 2.0, 3.0], [3.0, 2.5, 2.0, 1.8], [1.0, 3.0], [2.8, 2.1])
        ap.select("adapter-beta")  # no CSV: no plot
        qtbot.waitUntil(lambda: ap.inspection.name == "adapter-beta", timeout=TIMEOUT)
        assert not ap.inspector.loss_box.isVisibleTo(ap)
    finally:
        w.shutdown()


def test_column_view_marks_divergence_from_offset(qtbot):
    from lora_studio.core.compare import VariantOutput
    from lora_studio.core.compare.divergence import ColumnDivergence, TokenScores

    column = ColumnView("a", "adapter")
    qtbot.addWidget(column)
    column.append("hello world", 2)
    scores = TokenScores([-0.1, -2.0], [0.0, 1.5], [True, False])
    column.finish(
        VariantOutput("a", "hello world", [1, 2]), ColumnDivergence("a", 1, scores), "base", ["hello", " world"], 5
    )
    doc = column.text.document()
    fmt_before = doc.findBlock(0).begin().fragment().charFormat()
    assert fmt_before.background().color().name() != "#fde2c4"
    fragments = []
    it = doc.firstBlock().begin()
    while not it.atEnd():
        fragments.append((it.fragment().text(), it.fragment().charFormat().background().color().name()))
        it += 1
    assert fragments[-1] == (" world", "#fde2c4")
    assert "differs from token 1" in column.header.text() and "mean KL 0.750" in column.header.text()


def test_demo_prefill_and_startup_time_in_the_log(qtbot, tmp_path, data_dir, tiny_llama, llama_adapters):
    from lora_studio.core.demo.assets import demo_prompts

    w = loaded_window(qtbot, tmp_path, tiny_llama, [])
    try:
        qtbot.waitUntil(lambda: "window interactive after" in w.log_panel.contents(), timeout=TIMEOUT)
        w.adapter_panel.attach(str(llama_adapters["alpha"]), name="pirate")
        idle(qtbot, w)
        w.adapter_panel.attach(str(llama_adapters["beta"]), name="other")
        idle(qtbot, w)
        panel = w.compare_panel
        panel.prefill_demo()
        assert panel.prompts == [demo_prompts()["pirate"]]  # one demo prompt per attached demo adapter
        assert panel.prompt_box.edit.toPlainText() == demo_prompts()["pirate"]
        assert [name for name, _ in panel.ticked()] == ["base", "pirate"]
        assert panel.run_bar.run_btn.isEnabled()
    finally:
        w.shutdown()


def test_200_switch_attempts_while_the_panel_generates(qtbot, window):
    """Issue 7, under load, through the window: switching while Compare generates is refused (busy) every time,
    never half-applied; each column still holds what its own variant produces alone; switching works afterwards."""
    panel, adapters = window.compare_panel, window.adapter_panel
    panel.prompt_box.edit.setPlainText("The quick brown fox")
    panel.decoding.max_tokens.setValue(24)
    attempts = refused = 0
    while attempts < 200:
        panel.run()
        job = panel.job
        while attempts < 200 and not job.done:  # only attempts made while the comparison is running count
            refused += window._guard(adapters.activate, ["adapter-alpha", "adapter-beta"][attempts % 2]) is None
            attempts += 1
            qtbot.wait(1)  # let tokens stream between attempts
        idle(qtbot, window)
    assert refused == attempts == 200 and window.runner.is_idle()
    session = window.session
    for column in panel.columns:
        variant = Variant.base() if column.name == "base" else Variant.of_adapter(column.name)
        alone = compare(session, [variant], "The quick brown fox", GenerationSettings(max_new_tokens=24)).prompts[0]
        assert column.streamed == alone.output(column.name).text
    adapters.activate("adapter-beta")
    idle(qtbot, window)
    assert window.session.state().active_adapter == "adapter-beta"


def test_share_copies_markdown_and_saves_a_report(qtbot, window, tmp_path):
    from PySide6.QtWidgets import QApplication

    panel = window.compare_panel
    assert not panel.share.button.isEnabled()  # nothing to share yet
    panel.prompt_box.edit.setPlainText("hello")
    panel.decoding.max_tokens.setValue(4)
    panel.run()
    idle(qtbot, window)
    assert panel.share.button.isEnabled()
    panel.copy_markdown()
    idle(qtbot, window)
    text = QApplication.clipboard().text()
    assert text.startswith("# LoRA Studio comparison") and "adapter-alpha" in text and "sha256" in text
    page = tmp_path / "comparison.html"
    panel.write_report(page)
    # the file is renamed into place on the worker; the message follows when the window handles the job's end
    qtbot.waitUntil(lambda: page.exists() and "report saved" in panel.message.text(), timeout=TIMEOUT)
    assert "adapter-beta" in page.read_text()
    opened = []
    panel.open_url = opened.append
    panel.message.linkActivated.emit("#")  # the message's "open it"
    assert [Path(u.toLocalFile()) for u in opened] == [page]


def test_an_adapter_scale_reruns_the_comparison_live(qtbot, window):
    panel = window.compare_panel
    panel.prompt_box.edit.setPlainText("The quick brown fox")
    panel.decoding.max_tokens.setValue(8)
    panel.run()
    idle(qtbot, window)
    before = panel.column("adapter-alpha").streamed
    assert before != panel.column("base").streamed
    assert not panel.variants.scale_slider.isEnabled()  # no adapter selected yet
    panel.variants.set_scale_now("adapter-alpha", 0.0)  # scale 0: the adapter does nothing
    qtbot.waitUntil(lambda: window.session_model.state.scale_of("adapter-alpha") == 0.0, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: panel.job is not None or panel.column("adapter-alpha").streamed != before, timeout=TIMEOUT)
    idle(qtbot, window)
    assert panel.column("adapter-alpha").streamed == panel.column("base").streamed
    assert panel.variants.scale_slider.isEnabled() and panel.variants.scale_spin.value() == 0.0
    labels = [panel.variants.variant_list.item(i).text() for i in range(panel.variants.variant_list.count())]
    assert "adapter-alpha  ×0" in labels


def test_chat_keeps_a_history_per_variant_and_stop_keeps_partial_replies(qtbot, window):
    panel = window.compare_panel
    panel.set_chat_mode(True)
    assert panel.chat_mode and panel.chat.names() == ["base", "adapter-alpha", "adapter-beta"]
    panel.decoding.max_tokens.setValue(5)
    assert panel.send_chat("hello") is not None
    idle(qtbot, window)
    assert len(panel.conversation.turns) == 1 and panel.chat.input.toPlainText() == ""
    first = panel.conversation.turns[0]
    assert set(first.replies) == {"base", "adapter-alpha", "adapter-beta"}
    assert "one mixed batch" in panel.chat.note.text()
    panel.send_chat("and then?")
    idle(qtbot, window)
    assert len(panel.conversation.turns) == 2
    history = panel.conversation.messages_for("adapter-alpha")
    assert history[1]["content"] == first.replies["adapter-alpha"].text
    transcript = panel.chat.column("adapter-alpha").transcript.toPlainText()
    assert "hello" in transcript and "and then?" in transcript

    # Stop keeps what was said, marked stopped
    panel.decoding.max_tokens.setValue(30)  # the tiny model's context is 128 tokens
    assert panel.send_chat("go on") is not None
    panel.stop()  # within one decoding step
    idle(qtbot, window)
    assert len(panel.conversation.turns) == 3 and all(r.stopped for r in panel.conversation.turns[2].replies.values())
    assert "stopped" in panel.chat.column("base").transcript.toPlainText()

    panel.chat.new_chat_requested.emit()
    assert panel.conversation.turns == []
    panel.set_ticked(["base"])
    assert panel.chat.names() == ["base"]
    panel.send_chat("   ")
    assert panel.message.kind == "error" and "empty" in panel.message.text()
