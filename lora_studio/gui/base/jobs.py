"""The one worker pattern of the window: every long job goes through :class:`JobRunner`.

A job is a core callable ``fn(*, cancel, report) -> result`` (core/tasks.py). The
runner runs it on a private QThreadPool, so the GUI thread only ever draws; it
hands back, on the GUI thread:

* progress, throttled to about 20 updates a second (a per-tensor report from a
  10 000-tensor load must not flood the event loop). Only repeats of one stage
  (``Progress.stage``) are dropped: the first report of every new stage is delivered at
  once, so "verifying" shows the moment a merge's last tensor is written; the last
  report of a job is always delivered;
* exactly ONE terminal signal per job: ``finished(result)``, ``failed(ErrorDescription)``
  or ``cancelled()``. Errors are turned into words by ``core.errors.describe`` only.

Rules it enforces:

* **One model-mutating job at a time** (``exclusive=True``, the default): load,
  attach, generate, merge, save. While one runs, :attr:`busy_reason` says what it
  is ("busy: loading SmolLM2…") so panels disable conflicting buttons and show why;
  submitting another raises :class:`Busy`. The session's lock backs this up in the core.
* **Stale results are dropped** (Orange3's TaskState idea): a job submitted with a
  ``key`` (e.g. "estimate") supersedes the previous job with that key. The old one
  is told to cancel and ends, for its listeners, as ``cancelled`` right away; whatever
  it returns later is thrown away, so an old estimate never overwrites a new one.
  Keyed jobs must therefore not touch the model (they are read-only side jobs).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar

from PySide6.QtCore import QObject, Qt, QThreadPool, Signal, Slot

from lora_studio.core.errors import ErrorDescription, UserError, describe
from lora_studio.core.system.allocator import release_free_memory
from lora_studio.core.tasks import CancelToken, Progress, Report

PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress updates a second reach the GUI thread
# Workers (and the torch/OpenMP threads they spawn, which inherit it) run at a lower CPU priority than
# the GUI thread, so a machine busy with a load or a merge still repaints the window promptly.
WORKER_NICE = 5
# The GIL: while a worker runs Python (a model's forward pass, transformers' loading loops) the GUI thread gets
# the GIL back only when the worker is made to drop it, after the interpreter's switch interval (5 ms by
# default). A pyqtgraph repaint calls into Python from C++ dozens of times, each one waiting that long:
# measured, a chart repaint beside a busy Python thread takes ~20 ms at 5 ms and ~12 ms at 1 ms (alone: 7 ms).
GIL_SWITCH_INTERVAL_S = 0.001
_niced: set[int] = set()


def _lower_worker_priority() -> None:
    import os
    import sys

    tid = threading.get_native_id()
    if tid in _niced or not sys.platform.startswith("linux"):
        return
    _niced.add(tid)
    with contextlib.suppress(OSError, AttributeError):  # not allowed, or no such call here: stay as we are
        # Linux: PRIO_PROCESS with a thread id renices that one thread only.
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), WORKER_NICE))


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class JobFn(Protocol[T_co]):
    """A core job: ``fn(*, cancel, report) -> result`` (core/tasks.py)."""

    def __call__(self, *, cancel: CancelToken, report: Report) -> T_co: ...


JobState = Literal["running", "finished", "failed", "cancelled"]
RUNNING: JobState = "running"
FINISHED: JobState = "finished"
FAILED: JobState = "failed"
CANCELLED: JobState = "cancelled"


class Busy(UserError):
    """Another model job is running."""


class Job(QObject):
    """The GUI-thread handle of one job. Emits exactly one of finished / failed / cancelled."""

    progressed = Signal(object)  # Progress
    finished = Signal(object)  # the callable's result
    failed = Signal(object)  # ErrorDescription
    cancelled = Signal()

    def __init__(self, job_id: int, name: str, exclusive: bool, key: str | None, parent: QObject) -> None:
        super().__init__(parent)
        self.id = job_id
        self.name = name
        self.exclusive = exclusive
        self.key = key
        self.token = CancelToken()
        self.state: JobState = RUNNING
        self.started_at = time.monotonic()
        self.last_progress: Progress | None = None
        self.result: Any = None
        self.error: ErrorDescription | None = None

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def cancel(self) -> None:
        """Ask the job to stop; it ends with ``cancelled`` at its next safe point."""
        self.token.cancel()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Job {self.id} {self.name!r} {self.state}>"


class _Bridge(QObject):
    """Lives on the GUI thread; the worker emits through it, Qt queues the calls across."""

    progress = Signal(int, object)
    outcome = Signal(int, str, object)


class _Runnable:
    """One job's work on a pool thread, handed to the pool as a plain callable. A Python subclass of QRunnable, which
    the pool deleted itself, now and then stayed alive for good with the job's function and all it holds (the
    window's model list refreshed twice in a row, eight times: three kept)."""

    def __init__(self, job_id: int, fn: Callable, token: CancelToken, bridge: _Bridge) -> None:
        self._id, self._fn, self._token, self._bridge = job_id, fn, token, bridge
        self._last_emit = 0.0
        self._last_stage: str | None = None
        self._pending: Progress | None = None
        self._lock = threading.Lock()

    def _report(self, progress: Progress) -> None:
        now = time.monotonic()
        final = progress.total is not None and progress.done >= progress.total
        with self._lock:
            repeat = progress.stage == self._last_stage
            if repeat and not final and now - self._last_emit < PROGRESS_INTERVAL_S:
                self._pending = progress  # keep the newest; sent with the next one or before the outcome
                return
            # a new stage goes out at once; an older stage's pending repeat is superseded by it
            self._last_emit, self._last_stage = now, progress.stage
            self._pending = None
        self._bridge.progress.emit(self._id, progress)

    def run(self) -> None:  # worker thread
        _lower_worker_priority()
        payload: object  # the exception, the result, or None when cancelled
        try:
            result = self._fn(cancel=self._token, report=self._report)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes one terminal signal
            outcome, payload = "error", exc
        else:
            outcome, payload = ("cancelled", None) if self._token.cancelled else ("ok", result)
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and outcome == "ok":
            self._bridge.progress.emit(self._id, pending)
        self._bridge.outcome.emit(self._id, outcome, payload)


class JobRunner(QObject):
    """Runs core callables off the GUI thread. One per window; every panel uses it."""

    job_started = Signal(object)  # Job
    job_progress = Signal(object, object)  # Job, Progress
    job_finished = Signal(object, object)  # Job, result
    job_failed = Signal(object, object)  # Job, ErrorDescription
    job_cancelled = Signal(object)  # Job
    busy_changed = Signal(str)  # the busy reason, "" when free for model jobs
    refused = Signal(str)  # a model job was refused (Busy): its one-line reason, for the status bar

    def __init__(self, parent: QObject | None = None, max_threads: int = 3) -> None:
        super().__init__(parent)
        import sys

        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # process-wide; only ever lowered
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(max_threads)
        self._bridge = _Bridge(self)
        self._bridge.progress.connect(self._on_progress, Qt.ConnectionType.QueuedConnection)
        self._bridge.outcome.connect(self._on_outcome, Qt.ConnectionType.QueuedConnection)
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}  # not yet ended in the worker (stale keyed jobs included)
        self._by_key: dict[str, Job] = {}
        self._exclusive: Job | None = None
        self._closed = False

    # -- state ------------------------------------------------------------------------------------------------------
    @property
    def busy_reason(self) -> str:
        """'' when a model job may start; otherwise what is running, for tooltips and the status bar."""
        job = self._exclusive
        return f"busy: {job.name} — wait for it or press Cancel" if job is not None else ""

    @property
    def current(self) -> Job | None:
        """The running model job, if any."""
        return self._exclusive

    def running_jobs(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.done]

    def is_idle(self) -> bool:
        return not self._jobs

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` ran (the window is closing): panels start no new side jobs then."""
        return self._closed

    # -- submit -----------------------------------------------------------------------------------------------------
    def submit(
        self,
        name: str,
        fn: JobFn[T],
        *,
        exclusive: bool = True,
        key: str | None = None,
        on_done: Callable[[T], None] | None = None,
        on_error: Callable[[ErrorDescription], None] | None = None,
        on_cancel: Callable[[], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Job:
        """Start ``fn(cancel=, report=)`` on a worker thread. Callbacks run on the GUI thread.

        ``exclusive``: the job uses or changes the model (raises :class:`Busy` when another does).
        ``key``: a read-only side job that supersedes an older one with the same key.
        """
        if exclusive and key is not None:
            raise ValueError("keyed jobs are read-only side jobs; they cannot be exclusive")
        if exclusive and self._exclusive is not None:
            busy = Busy(self.busy_reason.split(" — ")[0], "wait for it to end or press Cancel")
            self.refused.emit(describe(busy).message)
            raise busy
        job = Job(next(self._ids), name, exclusive, key, self)
        if on_progress:
            job.progressed.connect(on_progress)
        if on_done:
            job.finished.connect(on_done)
        if on_error:
            job.failed.connect(on_error)
        if on_cancel:
            job.cancelled.connect(on_cancel)
        if key is not None:
            old = self._by_key.get(key)
            if old is not None and not old.done:
                old.cancel()
                self._end(old, CANCELLED, None)  # stale: whatever it returns later is dropped
            self._by_key[key] = job
        self._jobs[job.id] = job
        if exclusive:
            self._exclusive = job
        self.job_started.emit(job)
        if exclusive:
            self.busy_changed.emit(self.busy_reason)
        self._pool.start(_Runnable(job.id, fn, job.token, self._bridge).run)
        return job

    def cancel_current(self) -> None:
        if self._exclusive is not None:
            self._exclusive.cancel()

    def cancel_all(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()

    # -- delivery (GUI thread) ---------------------------------------------------------------------------------------
    @Slot(int, object)
    def _on_progress(self, job_id: int, progress: Progress) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.done:
            return  # a stale job's progress is not shown
        job.last_progress = progress
        job.progressed.emit(progress)
        self.job_progress.emit(job, progress)

    @Slot(int, str, object)
    def _on_outcome(self, job_id: int, outcome: str, payload: object) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if self._exclusive is job:
            self._exclusive = None
            self.busy_changed.emit("")
        if job.key is not None and self._by_key.get(job.key) is job:
            del self._by_key[job.key]
        if job.done:  # superseded earlier: its listeners already saw 'cancelled'
            job.deleteLater()
            return
        if outcome == "ok":
            self._end(job, FINISHED, payload)
        elif outcome == "cancelled":
            self._end(job, CANCELLED, None)
        else:
            desc = describe(payload)  # type: ignore[arg-type]
            self._end(job, CANCELLED if desc.kind == "cancelled" else FAILED, desc)
        job.deleteLater()
        if not self._jobs:
            # what the job and its listeners freed (a model, its results) goes back to the system now, not when the
            # heap happens to shrink at its top
            release_free_memory()

    def _end(self, job: Job, state: JobState, payload: object) -> None:
        if job.done:
            return
        job.state = state
        if state == FINISHED:
            job.result = payload
            job.finished.emit(payload)
            self.job_finished.emit(job, payload)
        elif state == FAILED:
            job.error = payload  # type: ignore[assignment]
            job.failed.emit(payload)
            self.job_failed.emit(job, payload)
        else:
            job.cancelled.emit()
            self.job_cancelled.emit(job)

    # -- shutdown -----------------------------------------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = 10_000) -> bool:
        """Cancel everything and wait for the workers (window close, tests). True if all ended."""
        self._closed = True
        self.cancel_all()
        ok = self._pool.waitForDone(timeout_ms)
        return bool(ok)
