"""The Log dock keeps its last lines only: a day of jobs does not grow it."""

from __future__ import annotations

from lora_studio.gui.docks.log import MAX_BLOCKS, LogPanel


def test_the_log_dock_keeps_its_last_lines_only(qtbot):
    panel = LogPanel()
    qtbot.addWidget(panel)
    for i in range(MAX_BLOCKS + 50):
        panel.log(f"finished: job {i}", "ok")
    assert panel.text.document().blockCount() == MAX_BLOCKS == len(panel.lines)
    assert panel.lines[0].endswith("finished: job 50") and panel.lines[-1].endswith(f"job {MAX_BLOCKS + 49}")
    assert panel.text.document().firstBlock().text() == panel.lines[0]
