"""What the Merge tab's helpers (export.py, preview.py, result.py) need of the tab: a Protocol the MergePanel
satisfies, so those helpers never import the panel that imports them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lora_studio.gui.base.ops import PanelHost

if TYPE_CHECKING:
    from PySide6.QtCore import QUrl, SignalInstance
    from PySide6.QtWidgets import QDialog

    from lora_studio.core.errors import UserError
    from lora_studio.core.export import ExportPlan, ExportResult
    from lora_studio.core.merge import MergePlan, MergeResult
    from lora_studio.core.model.sources import ModelSource
    from lora_studio.core.session import Session, SessionState
    from lora_studio.gui.base.jobs import Job
    from lora_studio.gui.tabs.merge.inputs import AdapterPicker, OutputBox
    from lora_studio.gui.tabs.merge.parts import AdapterRow


class ComparePreview(Protocol):
    """What the Merge tab asks of the Compare tab (the ComparePanel is one)."""

    def add_combination_variant(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None: ...

    def add_merged_variant(self, path: str, against: tuple[str, ...] = ()) -> Job | None: ...


class MergeTab(PanelHost, Protocol):
    """The Merge tab as its helpers see it."""

    # inputs and the last outcome
    state: SessionState
    source: ModelSource | None
    adapters: AdapterPicker
    output: OutputBox
    result: MergeResult | ExportResult | None
    plan_error: str
    # jobs of its own and its dialogs
    install_job: Job | None
    save_job: Job | None
    card_dialog: QDialog | None
    compare: ComparePreview
    confirm_overwrite: Callable[[Path], bool]
    open_url: Callable[[QUrl], object]
    ask_adapter_folder: Callable[[Path], Path | None]
    show_compare_tab: Callable[[], None]

    @property
    def session(self) -> Session: ...
    @property
    def log_line(self) -> SignalInstance: ...
    def checked_rows(self) -> list[AdapterRow]: ...
    def out_path(self) -> Path | None: ...
    def variant_name(self, combination: str) -> str: ...
    def show_card(self, card: Path) -> QDialog: ...
    def open_path(self, path: Path) -> None: ...
    def update_install_button(self) -> None: ...
    def run_plan(self, seq: int, what: str, key: str, plan: Callable[[], MergePlan | ExportPlan]) -> Job | None: ...
    def plan_done(self, seq: int, result: MergePlan | ExportPlan | UserError) -> None: ...
    def inputs_changed(self) -> None: ...
    def end_merge(self) -> None: ...
    def exported(self, result: ExportResult) -> None: ...
