"""The registry of the window's tabs: adding a tab is one entry here plus its folder under gui/tabs/.

Each entry names the tab and the panel class built from the window's one
:class:`~lora_studio.gui.base.context.TabContext`. The window builds them in this order, connects every one's chart
markers and log lines, and hands each the same context, so no tab is wired by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lora_studio.gui.base.context import TabContext
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.tabs.adapters.panel import AdapterPanel
from lora_studio.gui.tabs.compare.panel import ComparePanel
from lora_studio.gui.tabs.evaluate.panel import EvaluatePanel
from lora_studio.gui.tabs.merge.panel import MergePanel
from lora_studio.gui.tabs.reduce.panel import ReducePanel
from lora_studio.gui.tabs.train.panel import TrainPanel


@dataclass(frozen=True)
class TabSpec:
    key: str  # the tab's folder under gui/tabs/
    title: str  # the tab's label
    build: Callable[[TabContext], Panel]


TABS: tuple[TabSpec, ...] = (
    TabSpec("adapters", "Adapters", AdapterPanel),
    TabSpec("compare", "Compare", ComparePanel),
    TabSpec("evaluate", "Evaluate", EvaluatePanel),
    TabSpec("reduce", "Reduce", ReducePanel),
    TabSpec("merge", "Merge", MergePanel),
    TabSpec("train", "Train", TrainPanel),
)
