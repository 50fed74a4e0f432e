"""Every tab of the registry built alone from a context, without the main window; cross-tab actions go through the
context's navigator."""

from __future__ import annotations

import pytest

from lora_studio.core.model.sources import resolve_source
from lora_studio.gui.tabs.merge.panel import MergePanel
from lora_studio.gui.window.tabs import TABS


def load(context, base, adapters=()):
    """The session with ``base`` loaded and ``adapters`` attached, the snapshot shown by every panel."""
    session = context.session_model.session
    session.load(resolve_source(base))
    for name, path in adapters:
        session.attach(path, name)
    return context.session_model.refresh()


def test_the_registry_names_each_tab_folder_once():
    from pathlib import Path

    import lora_studio.gui.tabs as tabs_package

    folders = sorted(p.name for p in Path(tabs_package.__file__).parent.iterdir() if (p / "panel.py").is_file())
    assert sorted(spec.key for spec in TABS) == folders
    assert len({spec.title for spec in TABS}) == len(TABS)


@pytest.mark.parametrize("spec", TABS, ids=lambda spec: spec.key)
def test_each_tab_builds_alone_and_follows_the_session(make_tab, tab_context, tiny_llama, llama_adapters, spec):
    panel = make_tab(spec.build)
    assert not panel.state.loaded
    panel.update_buttons()
    state = load(tab_context, tiny_llama, [("alpha", llama_adapters["alpha"])])
    assert panel.state == state and panel.state.loaded
    panel.update_buttons()  # nothing in it reaches for a window
    assert panel.folders is tab_context.settings


def test_merge_preview_goes_to_compare_through_the_navigator(qtbot, make_tab, tab_context, tiny_llama, llama_adapters):
    panel = make_tab(MergePanel)
    load(tab_context, tiny_llama, sorted(llama_adapters.items()))
    qtbot.waitUntil(lambda: len(panel.rows) == 2)
    for row in panel.rows:
        row.check.setChecked(True)
    panel.preview_in_compare()
    calls = [name for name, _ in tab_context.navigator.calls]
    assert calls == ["add_combination_variant", "show_compare_tab"]
    _name, weights, combination, _density = tab_context.navigator.calls[0][1]
    assert set(weights) == {"alpha", "beta"} and combination == panel.adapters.combination()
