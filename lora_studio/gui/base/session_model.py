"""The window's one view of the session: a snapshot, and a signal when it changes.

Every panel listens to :attr:`SessionModel.state_changed` instead of the window pushing
a state into each one ("one hook refreshing every screen", like Anki's
``operation_did_execute``). The model takes a new snapshot whenever a model job ends
(the runner's ``busy_changed("")``, which comes before the job's own handlers), so a
change made by any panel, or by the window itself, reaches every panel once.

The threading rule: the session is read here on the GUI thread only while no model job
runs; a running job owns the session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Signal

from lora_studio.core.session import Session, SessionState
from lora_studio.gui.base.jobs import JobRunner

if TYPE_CHECKING:
    from lora_studio.core.model.sources import ModelSource


class SessionModel(QObject):
    state_changed = Signal(object)  # SessionState, after every change of the session

    def __init__(self, session: Session, runner: JobRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self._runner = runner
        self._state = session.state()
        self._source = session.source
        runner.busy_changed.connect(self._busy_changed)

    @property
    def state(self) -> SessionState:
        """The last snapshot (safe to read at any time)."""
        return self._state

    @property
    def source(self) -> ModelSource | None:
        """Where the loaded base came from, as of the last snapshot (``None`` when none is loaded)."""
        return self._source

    def has_chat_template(self) -> bool:
        """Whether the loaded tokenizer has a chat template (an attribute read, no model call)."""
        return bool(getattr(self.session.tokenizer, "chat_template", None))

    def refresh(self) -> SessionState:
        """Take a new snapshot; emit :attr:`state_changed` when it differs (a no-op while a model job runs)."""
        if self._runner.current is None:
            state, source = self.session.state(), self.session.source
            if state != self._state or source is not self._source:
                self._state, self._source = state, source
                self.state_changed.emit(state)
        return self._state

    def _busy_changed(self, reason: str) -> None:
        if not reason:
            self.refresh()
