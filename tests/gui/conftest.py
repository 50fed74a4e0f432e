from __future__ import annotations

from collections.abc import Sequence

import pytest
from window_helpers import make_window

from lora_studio.core.session import Session
from lora_studio.core.system.memory import MemorySampler
from lora_studio.gui.base.beside_store import BesideModels
from lora_studio.gui.base.context import TabContext
from lora_studio.gui.base.jobs import Job, JobRunner
from lora_studio.gui.base.session_model import SessionModel
from lora_studio.gui.base.settings import StudioSettings


@pytest.fixture
def window(qtbot, tmp_path, data_dir):
    w = make_window(qtbot, tmp_path)
    yield w
    w.shutdown()


class RecordingNavigator:
    """A navigator for a tab built alone: it records each cross-tab action instead of carrying it out."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def open_in_compare(self, prompt: str, variants: Sequence[str]) -> None:
        self.calls.append(("open_in_compare", (prompt, list(variants))))

    def use_scale_in_merge(self, adapter: str, scale: float) -> None:
        self.calls.append(("use_scale_in_merge", (adapter, scale)))

    def add_combination_variant(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None:
        self.calls.append(("add_combination_variant", (name, dict(weights), combination_type, density)))
        return None

    def add_merged_variant(self, path: str, against: tuple[str, ...] = ()) -> Job | None:
        self.calls.append(("add_merged_variant", (path, tuple(against))))
        return None

    def show_compare_tab(self) -> None:
        self.calls.append(("show_compare_tab", ()))

    def attach_adapter(self, path: str) -> Job | None:
        self.calls.append(("attach_adapter", (path,)))
        return None


@pytest.fixture
def tab_context(qtbot, tmp_path, data_dir):
    """The context one tab is built from, without the main window: a real runner, session and settings."""
    runner = JobRunner()
    session = Session()
    context = TabContext(
        runner=runner,
        session_model=SessionModel(session, runner),
        settings=StudioSettings(tmp_path / "tab.ini"),
        store=BesideModels(),
        sampler=MemorySampler(open_nvml=False),
        navigator=RecordingNavigator(),
    )
    yield context
    runner.shutdown()
    session.close()


@pytest.fixture
def make_tab(qtbot, tab_context):
    """``make_tab(PanelClass)``: one tab built alone from :func:`tab_context`, shown."""

    def build(panel_class):
        panel = panel_class(tab_context)
        qtbot.addWidget(panel)
        panel.show()
        return panel

    return build
