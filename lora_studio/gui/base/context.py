"""What every panel is handed: the one context object of the window.

A panel (a tab or a dock) is built from a :class:`TabContext` and nothing else: the job runner, the session model,
the remembered settings, the store of models loaded beside the session, the memory sampler, and a
:class:`Navigator` for actions that end in another tab ("open in Compare"). The window makes one context and hands
it to every panel its registry builds (gui/window/tabs.py); a test builds one to make one tab alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lora_studio.core.system.memory import MemorySampler
    from lora_studio.gui.base.beside_store import BesideModels
    from lora_studio.gui.base.jobs import Job, JobRunner
    from lora_studio.gui.base.session_model import SessionModel
    from lora_studio.gui.base.settings import StudioSettings


class Navigator(Protocol):
    """Actions that start in one tab and end in another; the main window carries them out."""

    def open_in_compare(self, prompt: str, variants: Sequence[str]) -> None:
        """Compare: this prompt, these variants ticked ("base" for the base), run."""

    def use_scale_in_merge(self, adapter: str, scale: float) -> None:
        """Merge: this adapter at this scale, the tab shown."""

    def add_combination_variant(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None:
        """Compare: a weighted combination of attached adapters as a column (made on the session)."""

    def add_merged_variant(self, path: str, against: tuple[str, ...] = ()) -> Job | None:
        """Compare: a merged folder loaded beside the session, ticked against the adapters it came from."""

    def show_compare_tab(self) -> None:
        """Bring the Compare tab to the front."""

    def attach_adapter(self, path: str) -> Job | None:
        """The adapter folder at ``path`` attached to the session (after a training run)."""


@dataclass(frozen=True)
class TabContext:
    """Everything a panel may depend on."""

    runner: JobRunner
    session_model: SessionModel
    settings: StudioSettings
    store: BesideModels
    sampler: MemorySampler
    navigator: Navigator
