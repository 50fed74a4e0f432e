"""The Compare tab's Share button: the last finished comparison as Markdown on the clipboard, or saved as a report.

The shareable document (core ``comparison_report``: the variants with their paths and hashes) is built on a
worker; core/report/share.py renders it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from PySide6.QtWidgets import QApplication, QMenu, QToolButton

from lora_studio.gui.base.jobs import Job
from lora_studio.gui.tabs.compare.host import CompareTab

if TYPE_CHECKING:
    from lora_studio.core.compare import ComparisonResult, Variant
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report

T = TypeVar("T")
Doc = dict[str, Any]


class ShareActions:
    """The Share button and its menu: Copy as Markdown, Save report…, for the comparison in :attr:`shown`."""

    def __init__(self, host: CompareTab) -> None:
        self.host = host
        self.shown: tuple[ComparisonResult, list[Variant]] | None = None  # the last finished run and its variants
        self.button = QToolButton()
        self.button.setText("Share")
        self.button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.button)
        self.copy_markdown_action = menu.addAction("Copy as Markdown", self.copy_markdown)
        self.save_report_action = menu.addAction("Save report…", self.save_report)
        self.button.setMenu(menu)

    def _with_report(self, name: str, then: Callable[[Doc], None]) -> Job | None:
        """Build the last comparison's shareable document (hashes read on a worker), then ``then(doc)``."""
        if self.shown is None:
            return None
        from lora_studio.core.evaluate.provenance import comparison_report

        result, variants = self.shown

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> Doc:
            return comparison_report(session, result, variants)

        return self.host.op(name, fn, progress=False).on_success(then).run()

    def copy_markdown(self) -> Job | None:
        from lora_studio.core.report.share import render

        def copy(doc: Doc) -> None:
            QApplication.clipboard().setText(render(doc, "markdown"))
            self.host.show_message("the comparison is on the clipboard as Markdown", "ok")

        return self._with_report("copying the comparison", copy)

    def save_report(self) -> None:
        path = self.host.ask_report_path("Save the comparison", "comparison.html")
        if path is not None:
            self.write_report(path)

    def write_report(self, path: Path) -> Job | None:
        from lora_studio.core.report.share import write_report

        host = self.host

        def write(doc: Doc) -> None:
            def fn(session: Session, *, cancel: CancelToken, report: Report) -> Path:
                return write_report(doc, path, overwrite=True)  # the dialog asked before replacing

            host.op("saving the report", fn, exclusive=False, key="compare-report", progress=False).on_success(
                lambda written: host.show_saved("report", written)
            ).run()

        return self._with_report("preparing the report", write)
