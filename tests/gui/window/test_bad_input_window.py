"""A representative part of the bad-input corpus through the real window: one line in the panel, no dialog,
and the window still loads a good model (and attaches a good adapter) afterwards."""

from __future__ import annotations

import re

import bad_inputs
import pytest
from PySide6.QtWidgets import QApplication, QDialog
from window_helpers import idle

TIMEOUT = 30_000
WINDOW_CASES = [
    "base-config-invalid-json",
    "base-weights-truncated",
    "adapter-shape-mismatch",
    "adapter-config-invalid-json",
    "adapter-weights-truncated",
    "adapter-weights-nan",
]


@pytest.fixture(scope="module")
def fixtures(tiny_llama, llama_adapters, wide_adapter, gpt2_adapter):
    return {
        "base": tiny_llama,
        "adapter": llama_adapters["alpha"],
        "wide_adapter": wide_adapter,
        "gpt2_adapter": gpt2_adapter,
    }


def no_dialogs():
    return [d for d in QApplication.topLevelWidgets() if isinstance(d, QDialog) and d.isVisible()]


def recovers(qtbot, w, fixtures):
    w.open_base(str(fixtures["base"]))
    idle(qtbot, w)
    assert w.session.loaded and "tiny-llama" in w.model_panel.loaded_label.text()
    w.attach_adapter(str(fixtures["adapter"]))
    idle(qtbot, w)
    assert w.session.active_adapter == "adapter-alpha"


@pytest.mark.parametrize("case_id", WINDOW_CASES)
def test_bad_input_shows_one_line_and_the_window_recovers(case_id, qtbot, window, fixtures, tmp_path):
    w = window
    case = next(c for c in bad_inputs.CASES if c.id == case_id)
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    if inputs["adapter"] is None:
        w.open_base(str(inputs["base"]))
        idle(qtbot, w)
        panel = w.model_panel
        assert not w.session.loaded
    else:
        w.open_base(str(inputs["base"]))
        idle(qtbot, w)
        w.attach_adapter(str(inputs["adapter"]))
        idle(qtbot, w)
        panel = w.adapter_panel
        assert w.session.state().adapters == ()
    text = panel.message.text()
    assert re.search(case.message, text), text
    assert "\n" not in text and "Traceback" not in w.log_panel.contents()
    assert panel.message.kind == "error"
    assert no_dialogs() == []
    if case_id == "adapter-shape-mismatch":  # the module and both shapes, in the panel and the status bar
        assert "model.layers.0.self_attn.q_proj" in w.job_status.label.text()
    recovers(qtbot, w, fixtures)


def test_cancel_during_load_then_a_good_load(qtbot, window, fixtures):
    w = window
    w.open_base(str(fixtures["base"]))
    w.model_panel.cancel_load()
    idle(qtbot, w)
    assert not w.session.loaded and "cancelled" in w.model_panel.message.text()
    assert no_dialogs() == []
    recovers(qtbot, w, fixtures)
