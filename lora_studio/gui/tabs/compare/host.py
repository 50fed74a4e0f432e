"""What the Compare tab's helpers (runs, chat mode, adapter edits, share, merged folders) need of the tab: a
Protocol the ComparePanel satisfies, so no helper imports the panel that imports it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lora_studio.gui.base.ops import PanelHost

if TYPE_CHECKING:
    from lora_studio.core.generation.generate import GenerationSettings
    from lora_studio.core.session import SessionState
    from lora_studio.gui.base.decoding import DecodingBox
    from lora_studio.gui.base.jobs import Job, JobRunner
    from lora_studio.gui.tabs.compare.columns import ColumnView
    from lora_studio.gui.tabs.compare.variants import VariantPicker


class CompareTab(PanelHost, Protocol):
    """The Compare tab as its helpers see it."""

    job: Job | None  # the tab's one running job (a comparison or a chat turn)

    @property
    def runner(self) -> JobRunner: ...
    @property
    def state(self) -> SessionState: ...
    @property
    def variants(self) -> VariantPicker: ...
    @property
    def decoding(self) -> DecodingBox: ...
    @property
    def columns(self) -> list[ColumnView]: ...
    def settings(self) -> GenerationSettings: ...
    def start_streaming(self) -> None: ...
    def stop_streaming(self) -> None: ...
    def available_variants(self) -> list[tuple[str, str]]: ...
    def base_name(self) -> str: ...
    def set_ticked(self, names: Sequence[str]) -> None: ...
    def ask_report_path(self, title: str, default_name: str) -> Path | None: ...
