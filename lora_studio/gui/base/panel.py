"""The base of every panel: its collaborators, its one message line, its progress bar, busy tooltips.

A panel receives what it depends on explicitly, in one :class:`~lora_studio.gui.base.context.TabContext`: the
window's :class:`~lora_studio.gui.base.jobs.JobRunner`, the :class:`~lora_studio.gui.base.session_model.SessionModel`,
the settings, the store of models loaded beside the session, the memory sampler and the navigator for cross-tab
actions. It never reaches into the window. It

* shows the session through :meth:`show_state`, called for every new snapshot the session model announces, and
  forgets what it said of the last base when another is loaded (:meth:`forget_base`);
* refreshes its buttons through :meth:`update_buttons`, called when the runner becomes busy or free and around
  every job it runs (:meth:`set_reasons` enables a button or disables it with the reason as its tooltip);
* runs its jobs through :meth:`op` (see :mod:`lora_studio.gui.base.ops`);
* says what happened in its one :class:`~lora_studio.gui.base.widgets.MessageLine` (an error stays until the next
  success replaces it) and asks for a chart marker or a log line through its signals;
* opens its file dialogs where the last one of the same kind ended (:meth:`start_folder`, :meth:`remember_folder`;
  the context's settings, as :attr:`folders`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QAbstractButton, QWidget

from lora_studio.core.session import SessionState
from lora_studio.gui.base.file_filters import REPORT_FILTER
from lora_studio.gui.base.jobs import Job, JobRunner
from lora_studio.gui.base.ops import PanelOp, SessionJob
from lora_studio.gui.base.widgets import MessageLine, job_progress_bar, reset_progress

if TYPE_CHECKING:
    from lora_studio.core.session import Session
    from lora_studio.gui.base.context import TabContext
    from lora_studio.gui.base.session_model import SessionModel
    from lora_studio.gui.base.settings import StudioSettings


T = TypeVar("T")


class Panel(QWidget):
    marker = Signal(str)  # a memory-chart marker: "attached alpha", "merged"
    log_line = Signal(str, str)  # (message, level) for the Log panel

    def __init__(self, ctx: TabContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.runner: JobRunner = ctx.runner
        self.session_model: SessionModel = ctx.session_model
        self.state: SessionState = ctx.session_model.state
        self.message = MessageLine()
        self.progress = job_progress_bar()
        self.folders: StudioSettings = ctx.settings  # file dialogs open where the last one of their kind ended
        self.job: Job | None = None  # the job the panel's own Cancel stops (see run_cancellable)
        self.open_url: Callable[[QUrl], object] = QDesktopServices.openUrl  # the desktop's app (tests record it)
        self._shown_base: tuple[str | None, bool] = (self.state.base_path, self.state.loaded)
        ctx.runner.busy_changed.connect(self._busy_changed)
        ctx.session_model.state_changed.connect(self._check_base)  # first: a new base's lines come after
        ctx.session_model.state_changed.connect(self.show_state)

    @property
    def session(self) -> Session:
        """The session, for the callables a job runs on a worker (never called into on the GUI thread)."""
        return self.session_model.session

    # -- what subclasses fill in ---------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        """Show a new session snapshot (the session model calls this after every change)."""
        self.state = state

    def forget_base(self) -> None:
        """Another base was loaded (or the base unloaded): what the panel said of the last one goes (an "attached
        …" or "trained …" line, a merge's result), unless a job of the panel's still runs. Tabs add their own."""
        if self.job is None or self.job.done:
            self.show_message("", "info")

    def _check_base(self, state: SessionState) -> None:
        base = (state.base_path, state.loaded)
        if base != self._shown_base:
            self._shown_base = base
            self.forget_base()

    def update_buttons(self) -> None:
        """Enable what may run now, with the reason as the tooltip of what may not."""

    def _busy_changed(self, _reason: str) -> None:
        self.update_buttons()

    # -- jobs ----------------------------------------------------------------------------------------------------------
    def op(
        self,
        name: str,
        fn: SessionJob[T],
        *,
        exclusive: bool = True,
        key: str | None = None,
        progress: bool = True,
    ) -> PanelOp[T]:
        """A job of this panel: add handlers to it, then ``.run()``."""
        return PanelOp(self, name, fn, exclusive=exclusive, key=key, progress=progress)

    def run_cancellable(self, op: PanelOp[T]) -> Job | None:
        """Run ``op`` as the panel's cancellable job: :attr:`job` while it runs (:meth:`stop` cancels it), the
        buttons refreshed when it starts and ends."""
        job = op.on_end(self._cancellable_ended).run()
        if job is not None:
            self.job = job
            self.update_buttons()
        return job

    def stop(self) -> None:
        """The panel's Cancel: the running :attr:`job` ends at its next safe point."""
        self.cancel_job(self.job, "cancelling…", "warn")

    def _cancellable_ended(self) -> None:
        self.job = None
        self.update_buttons()

    def cancel_job(self, job: Job | None, message: str = "cancelling…", kind: str = "info") -> bool:
        """Ask a running job to stop (it ends at its next safe point); True if there was one."""
        if job is None or job.done:
            return False
        job.cancel()
        self.show_message(message, kind)
        return True

    @property
    def busy_reason(self) -> str:
        """'' when a model job may start; otherwise what runs ("busy: loading …")."""
        return self.runner.busy_reason

    # -- the message line and the progress bar -------------------------------------------------------------------------
    def show_message(self, text: str, kind: str = "info") -> None:
        self.message.show_message(text, kind)

    def show_saved(self, what: str, path: Path) -> None:
        """'<what> saved: <path> — open it', the link opening the file in the desktop's app."""
        self.message.show_with_link(f"{what} saved: {path}", "open it", lambda: self.open_path(path))

    def open_path(self, path: Path) -> None:
        """``path`` in the desktop's app for it; where none opens it (no browser, no file manager), it says so."""
        # the desktop's launcher may take the request and then find no program (xdg-open without a desktop says
        # so only on its stderr): where the file is, is said either way
        if self.open_url(QUrl.fromLocalFile(str(path))):
            self.show_message(f"asked the desktop to open {path.name}; if nothing opens, it is at {path}", "info")
        else:
            self.show_message(f"no program here opens {path.name}; it is at {path}", "info")

    def clear_error(self) -> None:
        """A success after a failure: the old error line goes (a success handler may then say more)."""
        if self.message.kind == "error":
            self.message.show_message("", "info")

    def begin_progress(self) -> None:
        self.progress.show()
        self.progress.setRange(0, 0)  # busy until the first report

    def end_progress(self) -> None:
        reset_progress(self.progress)
        self.progress.hide()

    # -- file dialogs --------------------------------------------------------------------------------------------------
    def start_folder(self, kind: str, fallback: str = "") -> str:
        """Where a file dialog of this kind opens: where the last one ended, else ``fallback``, else home."""
        last = self.folders.last_folder(kind) if self.folders is not None else None
        return last or fallback or str(Path.home())

    def remember_folder(self, kind: str, path: str) -> None:
        """A dialog of this kind ended on ``path``: the next one opens beside it."""
        if self.folders is not None and path:
            self.folders.remember_folder(kind, path)

    def ask_report_path(self, title: str, default_name: str) -> Path | None:
        """The save dialog for a report (core/report/share.py's formats), opened where the last report went."""
        from PySide6.QtWidgets import QFileDialog

        start = str(Path(self.start_folder("report")) / default_name)
        path, _ = QFileDialog.getSaveFileName(self, title, start, REPORT_FILTER)
        if not path:
            return None
        self.remember_folder("report", str(Path(path).parent))
        return Path(path)

    @staticmethod
    def set_reasons(buttons: Mapping[QAbstractButton, tuple[str, str]]) -> None:
        """``{button: (reason, tip)}``: enabled with ``tip`` as its tooltip when ``reason`` is '', else disabled
        with the reason as its tooltip (the busy tooltips)."""
        for button, (reason, tip) in buttons.items():
            button.setEnabled(not reason)
            button.setToolTip(reason or tip)
