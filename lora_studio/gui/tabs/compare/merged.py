"""Merged model folders as Compare columns: loaded read-only beside the session (a job), unloaded on a worker.

The Merge tab's "Compare merged vs adapter" lands in :meth:`MergedFolders.add` with the adapters the folder
came from: exactly those columns are ticked, the adapter being the reference. The GUI thread never calls into
a merged model: it travels as an opaque reference from the job that loaded it to the job that compares it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from PySide6.QtWidgets import QFileDialog, QWidget

from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.ops import unique_name
from lora_studio.gui.tabs.compare.columns import KIND_ADAPTER
from lora_studio.gui.tabs.compare.host import CompareTab

if TYPE_CHECKING:
    from lora_studio.core.compare import BesideModel
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report

T = TypeVar("T")


class MergedFolders:
    """The Compare tab's merged-folder variants: add (Add merged folder…, or from the Merge tab), remove, release."""

    def __init__(self, panel: CompareTab, dialog_parent: QWidget) -> None:
        self.panel, self.dialog_parent = panel, dialog_parent

    def browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self.dialog_parent, "Choose a merged model folder", str(Path.home()))
        if path:
            self.add(path)

    def add(self, path: str, against: Sequence[str] = ()) -> Job | None:
        """Load a merged model folder read-only beside the session (a job), then tick it as a column.

        ``against``: the adapters the folder was merged from ("Compare merged vs adapter"): then exactly the
        merged column and those adapters are ticked, the first adapter being the reference, and a folder
        already loaded beside the session is reused rather than loaded twice.
        """
        from lora_studio.core.compare import load_beside

        panel, variants = self.panel, self.panel.variants
        against = list(against)
        loaded = variants.merged_named_for(str(path)) if against else None
        if loaded is not None:
            self._tick_against(loaded, against)
            return None
        stem = Path(path).name or "merged"
        name = unique_name(stem, (n for n, _ in panel.available_variants()))

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> BesideModel:
            return load_beside(path, session, cancel=cancel, report=report)

        def done(beside: BesideModel) -> None:
            variants.add_merged(name, beside, str(path))
            if against:
                self._tick_against(name, against)
            else:
                panel.show_message(f"{name}: merged folder loaded beside the base, ready to compare", "ok")

        what = f"loading {stem} beside the base"
        return panel.op(what, fn, progress=False).on_success(done).run(f"{what}…")

    def _tick_against(self, merged: str, adapters: list[str]) -> None:
        """Tick exactly ``merged`` and the ``adapters`` it came from; the first attached one is the reference."""
        panel = self.panel
        attached = {name for name, kind in panel.available_variants() if kind == KIND_ADAPTER}
        sources = [a for a in adapters if a in attached]
        reference = sources[0] if sources else panel.base_name()  # its adapters are gone: against the base then
        panel.set_ticked([merged, *sources] if sources else [merged, reference])
        panel.variants.set_reference(reference)
        gone = [a for a in adapters if a not in attached]
        note = f" ({', '.join(gone)} no longer attached)" if gone else ""
        panel.show_message(f"{merged} against {reference}{note}: press Run to compare", "ok")

    def remove_selected(self) -> None:
        variants = self.panel.variants
        name = variants.selected_merged()
        if name is None:
            return
        self.release(variants.take_merged([name]))
        variants.fill()
        self.panel.show_message(f"unloaded {name}", "ok")

    def release(self, held: list[BesideModel]) -> None:
        """Drop the references to merged models taken off the variant list."""
        if not held:
            return
        from lora_studio.core.session import release_memory

        # The last reference goes away on a worker, where freeing the model's memory is allowed to take a while.
        def fn(*, cancel: CancelToken, report: Report) -> None:
            held.clear()
            release_memory()

        try:
            self.panel.runner.submit("unloading merged models", fn, exclusive=False)
        except Exception:  # noqa: BLE001 - the references are dropped here then; nothing to tell
            held.clear()
