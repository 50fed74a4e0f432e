"""Progress that tells the truth: the window shows every stage of a merge, verification included, unclipped."""

from __future__ import annotations

from pathlib import Path

from window_helpers import TIMEOUT_MS, idle

from lora_studio.core.tasks import Progress
from lora_studio.gui.base.widgets import ElidedLabel, job_progress_bar, progress_text, show_progress


def test_merge_shows_verifying_in_the_panel_and_the_status_bar(qtbot, window, tiny_llama, llama_adapters, tmp_path):
    w = window
    w.open_base(str(tiny_llama))
    idle(qtbot, w)
    w.attach_adapter(str(llama_adapters["alpha"]))
    idle(qtbot, w)
    panel = w.merge_panel
    w.tabs.setCurrentWidget(panel)
    qtbot.waitUntil(lambda: [r.name for r in panel.rows] == [Path(llama_adapters["alpha"]).name], timeout=TIMEOUT_MS)
    panel.output.out_edit.setText(str(tmp_path / "out"))
    qtbot.waitUntil(
        lambda: not panel.plan_pending and w.runner.is_idle() and panel.run_row.merge_btn.isEnabled(),
        timeout=TIMEOUT_MS,
    )
    status_texts, panel_texts = [], []

    def seen(job, progress) -> None:  # after the window's and the panel's own slots drew it
        status_texts.append(w.job_status.progress.format())
        panel_texts.append(panel.progress.format())

    w.runner.job_progress.connect(seen)
    job = panel.start_merge()
    assert job is not None
    idle(qtbot, w)
    w.runner.job_progress.disconnect(seen)
    assert job.state == "finished", panel.message.text()
    for texts in (status_texts, panel_texts):
        merging = next(i for i, t in enumerate(texts) if t.startswith("merging tensor"))
        verifying = [i for i, t in enumerate(texts) if t.startswith("verifying")]
        assert verifying and verifying[0] > merging, texts
        assert any(t.startswith("verifying: running the adapter model: ") and t.endswith(" prompts") for t in texts), (
            texts
        )
        assert any(t.startswith("verifying: running the saved folder: ") for t in texts), texts
    assert " KiB" in next(t for t in status_texts if t.startswith("merging tensor"))  # bytes as KiB/MiB, not raw


def test_progress_text_is_stage_and_count():
    assert (
        progress_text(Progress(2, 3, "verifying: running the adapter model", "prompts"))
        == "verifying: running the adapter model: 2/3 prompts"
    )
    assert progress_text(Progress(0, None, "loading weights")) == "loading weights"
    assert progress_text(Progress(3 * 1024**2, 8 * 1024**2, "merging tensor 5/272", "bytes")) == (
        "merging tensor 5/272 · 3.0 MiB of 8.0 MiB"
    )


def test_long_texts_elide_with_the_full_text_in_the_tooltip(qtbot):
    bar = job_progress_bar()
    qtbot.addWidget(bar)
    bar.setFixedWidth(160)
    bar.show()
    long = Progress(7, 12, "verifying: loading the saved folder", "tensors")
    show_progress(bar, long)
    full = progress_text(long)
    assert bar.format() == full and bar.toolTip() == full
    drawn = bar.text()  # what the style draws
    assert drawn != full and "…" in drawn and drawn.endswith("12 tensors")  # the count at the end stays
    bar.setFixedWidth(260)  # room for the count and the start of the stage: the stage is cut at its end
    drawn = bar.text()
    assert drawn.startswith("verifying: ") and drawn.endswith("…: 7/12 tensors"), drawn
    label = ElidedLabel("x" * 400)
    qtbot.addWidget(label)
    label.setFixedWidth(120)
    label.show()
    assert label.text() == "x" * 400 and label.toolTip() == "x" * 400
    assert label.minimumSizeHint().width() == 0  # a long status never widens the window


def test_a_busy_bar_says_its_stage_and_moves_a_few_times_a_second(qtbot):
    """While busy the bar draws its own sliding block (the style's busy animation repainted it 60 times a second)."""
    bar = job_progress_bar()
    qtbot.addWidget(bar)
    bar.resize(400, 24)
    bar.show()
    show_progress(bar, Progress(0, None, "training: loading the model"))
    assert bar.is_busy() and bar.text() == "training: loading the model"  # Qt's own text() is empty while busy
    painted = []
    original = bar.paintEvent

    def counting(event) -> None:
        painted.append(event)
        original(event)

    bar.paintEvent = counting
    qtbot.wait(1000)
    assert 3 <= len(painted) <= 1000 // bar.BUSY_FRAME_MS + 3, len(painted)
    show_progress(bar, Progress(1, 4, "training", "steps"))
    qtbot.wait(bar.BUSY_FRAME_MS * 2)
    assert not bar.is_busy() and not bar._busy_timer.isActive()
