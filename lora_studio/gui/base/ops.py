"""One helper for a panel's job: submit a core callable, show its progress, say Busy or the error, end.

In the spirit of Anki's ``aqt.operations`` (``CollectionOp``/``QueryOp``) and Orange's
``ConcurrentWidgetMixin``: a panel describes *what* to run and what to do with the
result; :class:`PanelOp` does the rest, the same way in every panel::

    def run(session: Session, *, cancel: CancelToken, report: Report) -> SessionState:
        session.activate(name)
        return session.state()

    self.op(f"activating {name}", run).on_success(lambda state: self.show_ok(f"{name} is active")).run()

* the callable receives the session and the job's cancel token and report; :class:`PanelOp` is generic over what
  it returns, so a success handler is checked against the callable's result type;
* a typed "no" (:meth:`PanelOp.on_refusal`: a question to ask, a reason to show by a button) reaches its handler
  on the GUI thread instead of failing the job;
* it submits through the window's one :class:`~lora_studio.gui.base.jobs.JobRunner` (its contract is unchanged:
  one model job at a time, keyed side jobs superseding older ones);
* a refused model job (:class:`~lora_studio.gui.base.jobs.Busy`) is one line in the panel's message line and
  ``run()`` returns ``None`` (the runner also says it, for the status bar);
* while the job runs, the panel's progress bar shows its progress; at the end it is reset and hidden
  *before* any handler runs, whatever the outcome;
* a failure is the error in the panel's message line, a cancellation a warning, unless the panel gives its own
  handler; a success of a model job clears an error left by an earlier one (one error line per panel);
* the panel's buttons are refreshed after the submit and after the end.

The session snapshot every panel shows is refreshed by the :class:`~lora_studio.gui.base.session_model.SessionModel`
when a model job ends, before the handlers here run, so a success handler sees the new state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from lora_studio.core.errors import ErrorDescription, describe
from lora_studio.gui.base.jobs import Busy, Job, JobRunner
from lora_studio.gui.base.widgets import show_progress

if TYPE_CHECKING:
    from PySide6.QtWidgets import QProgressBar

    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
E = TypeVar("E", bound=Exception)


class SessionJob(Protocol[T_co]):
    """What a panel runs on a worker: the session, the job's cancel token and report, and a result."""

    def __call__(self, session: Session, *, cancel: CancelToken, report: Report) -> T_co: ...


class OpHost(Protocol):
    """What an op needs of the panel that runs it (the :class:`~lora_studio.gui.base.panel.Panel` is one)."""

    @property
    def runner(self) -> JobRunner: ...
    @property
    def session(self) -> Session: ...
    @property
    def progress(self) -> QProgressBar: ...
    def show_message(self, text: str, kind: str = "info") -> None: ...
    def clear_error(self) -> None: ...
    def begin_progress(self) -> None: ...
    def end_progress(self) -> None: ...
    def update_buttons(self) -> None: ...


@dataclass(frozen=True)
class _Refused:
    """A refusal the worker caught for :meth:`PanelOp.on_refusal`, on its way to the GUI thread."""

    error: BaseException


@dataclass(frozen=True)
class _RefusalRoute:
    matches: Callable[[BaseException], bool]
    handler: Callable[[BaseException], None]


class PanelHost(Protocol):
    """What a panel's helpers (a box, a controller in the tab's folder) may ask of their panel: its jobs and its
    message line. Every :class:`~lora_studio.gui.base.panel.Panel` is one; a tab's own host Protocol extends it."""

    def show_message(self, text: str, kind: str = "info") -> None: ...
    def update_buttons(self) -> None: ...
    def op(
        self, name: str, fn: SessionJob[T], *, exclusive: bool = True, key: str | None = None, progress: bool = True
    ) -> PanelOp[T]: ...


class PanelOp(Generic[T]):
    """One job started from a panel. Build it with :meth:`Panel.op`, add handlers, then :meth:`run` it."""

    def __init__(
        self,
        panel: OpHost,
        name: str,
        fn: SessionJob[T],
        *,
        exclusive: bool = True,
        key: str | None = None,
        progress: bool = True,
    ) -> None:
        self.panel, self.name, self.fn = panel, name, fn
        self.exclusive, self.key, self.progress = exclusive, key, progress
        self._success: Callable[[T], None] | None = None
        self._failure: Callable[[ErrorDescription], None] | None = None
        self._cancel: Callable[[], None] | None = None
        self._end: list[Callable[[], None]] = []
        self._refusal: _RefusalRoute | None = None

    # -- handlers (each returns the op, so they chain) -----------------------------------------------------------------
    def on_success(self, handler: Callable[[T], None]) -> PanelOp[T]:
        """Called with the callable's result."""
        self._success = handler
        return self

    def on_failure(self, handler: Callable[[ErrorDescription], None]) -> PanelOp[T]:
        """Replaces the default: the error's one line in the panel's message line."""
        self._failure = handler
        return self

    def on_cancel(self, handler: Callable[[], None]) -> PanelOp[T]:
        """Replaces the default: '<name>: cancelled' as a warning in the message line."""
        self._cancel = handler
        return self

    def on_refusal(
        self,
        kind: type[E],
        handler: Callable[[E], None],
        when: Callable[[E], bool] = lambda _: True,
    ) -> PanelOp[T]:
        """A typed "no" the callable raises (``kind``, where ``when`` says so) is not a failure: the job ends as
        finished and ``handler`` gets the exception on the GUI thread (a question to ask, a reason to show by a
        button). Any other exception is a failure as usual."""

        def route(exc: BaseException) -> bool:
            return isinstance(exc, kind) and when(exc)

        def handle(exc: BaseException) -> None:
            if isinstance(exc, kind):  # always: only what route() matched is handed here
                handler(exc)

        self._refusal = _RefusalRoute(route, handle)
        return self

    def on_end(self, handler: Callable[[], None]) -> PanelOp[T]:
        """Clean-up that runs at every end (after the progress bar is reset, before the outcome's handler)."""
        self._end.append(handler)
        return self

    # -- run -----------------------------------------------------------------------------------------------------------
    def run(self, start_message: str | None = None) -> Job | None:
        """Submit the job; returns it, or ``None`` when the runner refused it (Busy, said in the message line)."""
        panel = self.panel
        bar = panel.progress
        fn, session = self.fn, panel.session

        refusal = self._refusal

        def job_fn(*, cancel: CancelToken, report: Report) -> T | _Refused:
            try:
                return fn(session, cancel=cancel, report=report)
            except Exception as exc:
                if refusal is not None and refusal.matches(exc):
                    return _Refused(exc)
                raise

        # Lambdas, not bound methods: PySide holds a bound method's object weakly, and nothing else keeps this op
        # alive until its job ends; the job's connections hold the lambdas (and so the op) until then.
        try:
            job = panel.runner.submit(
                self.name,
                job_fn,
                exclusive=self.exclusive,
                key=self.key,
                on_done=lambda result: self._finished(result),
                on_error=lambda desc: self._failed(desc),
                on_cancel=lambda: self._cancelled(),
                on_progress=(lambda p: show_progress(bar, p)) if self.progress else None,
            )
        except Busy as exc:
            panel.show_message(describe(exc).message, "warn")
            return None
        if self.progress:
            panel.begin_progress()
        if start_message:
            panel.show_message(start_message)
        panel.update_buttons()
        return job

    def _ended(self) -> None:
        if self.progress:
            self.panel.end_progress()
        for handler in self._end:
            handler()

    def _finished(self, result: T | _Refused) -> None:
        self._ended()
        if isinstance(result, _Refused):
            if self._refusal is not None:
                self._refusal.handler(result.error)
        else:
            if self.exclusive:
                self.panel.clear_error()
            if self._success is not None:
                self._success(result)
        self.panel.update_buttons()

    def _failed(self, desc: ErrorDescription) -> None:
        self._ended()
        if self._failure is not None:
            self._failure(desc)
        else:
            self.panel.show_message(desc.message, "error")  # the details are in the log (the window logs failed jobs)
        self.panel.update_buttons()

    def _cancelled(self) -> None:
        self._ended()
        if self._cancel is not None:
            self._cancel()
        else:
            self.panel.show_message(f"{self.name}: cancelled", "warn")
        self.panel.update_buttons()


def unique_name(stem: str, taken: Iterable[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``… : the first that is not taken (adapter, column and preview names)."""
    taken = set(taken)
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name
