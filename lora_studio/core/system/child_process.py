"""A long job run in a child process, with the same shape as in a thread: ``fn(..., *, cancel, report) -> result``.

Why: a Python thread shares the interpreter lock with the window's GUI thread. Training holds it in long stretches
(the tokenizer's parse, the chat template over every row, the trainer's own Python between the kernels), and each
stretch is a stall the user sees. In a child process the window keeps its interpreter to itself; and a run the
system kills for memory ends the run, not the window.

:func:`run_in_child_process` starts a fresh interpreter (``spawn``: the window's threads and Qt are not forked),
runs ``fn(*args, cancel=..., report=..., **callbacks)`` there and returns its result, or raises what it raised.
``report`` and every function in ``callbacks`` are called in the calling thread with what the child passed them;
the cancel token is forwarded (the job sees its own token set, and stops as it would in a thread); the child's
log records are handled by the caller's loggers (the log file and the window's log), and its Python warnings
are logged. Arguments, results, reports and exceptions cross as pickles: ``fn`` must be a module-level function.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from lora_studio.core.errors import Cancelled, OutOfMemory
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

T = TypeVar("T")

_POLL_S = 0.05  # how often the caller looks at its cancel token while the child is quiet
_JOIN_S = 30.0  # after the result: how long a child may take to exit before it is terminated
WORKER_NICENESS = 10


def run_in_child_process(
    fn: Callable[..., T],
    *args: Any,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    callbacks: dict[str, Callable[[Any], None]] | None = None,
    name: str = "lora-studio-job",
) -> T:
    """``fn(*args, cancel=, report=, **callbacks)`` in a new process; its result, or its exception re-raised here."""
    cancel = cancel or CancelToken()
    callbacks = callbacks or {}
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_child_main, args=(fn, args, tuple(callbacks), theirs), name=name, daemon=True)
    report(Progress(0, None, "starting a worker process"))
    child.start()
    # Lowered from here, at once: the child's own bootstrap imports fn's module (torch, transformers, TRL: seconds
    # of CPU) before _child_main can lower itself, and at the window's priority that competed with the GUI thread.
    _lower_priority(child.pid)
    _running.add(child.pid or 0)
    theirs.close()  # ours is now the only end here: EOF on it means the child is gone
    cancel_sent = False
    outcome: tuple[str, Any, str] | None = None
    try:
        while outcome is None:
            if cancel.cancelled and not cancel_sent:
                _send_quietly(ours, ("cancel",))
                cancel_sent = True
            if not ours.poll(_POLL_S):
                if not child.is_alive() and not ours.poll(0):
                    break
                continue
            try:
                message = ours.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "report":
                report(message[1])
            elif kind == "callback":
                callbacks[message[1]](message[2])
            elif kind == "log":
                _handle_log(message[1])
            else:  # "result" or "error"
                outcome = message
    finally:
        if outcome is None or cancel.cancelled:
            _send_quietly(ours, ("cancel",))  # the caller itself failed or stopped: the child stops too
        child.join(_JOIN_S if outcome is not None else 5.0)
        if child.is_alive():
            child.terminate()
            child.join(5.0)
        ours.close()
        _running.discard(child.pid or 0)
    if outcome is None:
        raise _death(child.exitcode, cancel.cancelled)
    kind, payload, child_traceback = outcome
    if kind == "result":
        return payload
    if child_traceback and not isinstance(payload, Cancelled):
        payload.add_note(f"in the worker process:\n{child_traceback}")
    raise payload


_running: set[int] = set()  # the workers' process ids (multiprocessing's own helper processes are not among them)


def running_workers() -> frozenset[int]:
    """The process ids of the workers running now, for the memory chart."""
    return frozenset(_running)


class ChildProcessDied(RuntimeError):
    """The worker process ended without a result: killed (by the system, for memory) or crashed."""


def _death(exitcode: int | None, cancelled: bool) -> Exception:
    if cancelled:
        return Cancelled("the worker process ended while stopping")
    if exitcode == -9:  # SIGKILL: on Linux, the kernel's out-of-memory killer (or a user's kill -9)
        return OutOfMemory(
            "the worker process was killed (SIGKILL), most likely by the system for lack of memory",
            "use less memory: a smaller batch or max length, a smaller dtype, or close other programs",
        )
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            signal_name = signal.Signals(-exitcode).name
        except ValueError:
            signal_name = f"signal {-exitcode}"
        return ChildProcessDied(f"the worker process crashed ({signal_name}); the log has what it did last")
    return ChildProcessDied(f"the worker process ended without a result (exit code {exitcode})")


def _lower_priority(pid: int | None) -> None:
    """The worker below the window: the scheduler then runs the GUI thread the moment it wakes, every core busy."""
    with contextlib.suppress(OSError, AttributeError):  # no setpriority() on Windows; the process may be gone
        os.setpriority(os.PRIO_PROCESS, pid or 0, max(os.getpriority(os.PRIO_PROCESS, pid or 0), WORKER_NICENESS))


def _send_quietly(conn: Connection, message: tuple) -> None:
    with contextlib.suppress(OSError, ValueError):  # the other side is gone: nobody left to tell
        conn.send(message)


def _handle_log(record_fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(record_fields)
    logging.getLogger(record.name).handle(record)


# -- in the child ----------------------------------------------------------------------------------------------------


class _Outbox:
    """The child's end of the pipe, shared by the job's threads (a lock per message) and the cancel listener."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.open = True

    def send(self, message: tuple) -> None:
        if not self.open:
            return
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                self.open = False  # the caller is gone; the job goes on to its end (or its cancel)


class _ForwardingHandler(logging.Handler):
    def __init__(self, outbox: _Outbox) -> None:
        super().__init__(logging.DEBUG)
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(record.__dict__)
        fields["msg"], fields["args"] = record.getMessage(), None  # the arguments may not pickle
        if record.exc_info:
            fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
        fields["exc_info"] = None
        fields["processName"] = "worker"
        self.outbox.send(("log", fields))


def _listen_for_cancel(conn: Connection, cancel: CancelToken) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the caller is gone: stop as if asked
            cancel.cancel()
            return
        if message[0] == "cancel":
            cancel.cancel()


def _child_main(fn: Callable[..., Any], args: tuple, callback_names: tuple[str, ...], conn: Connection) -> None:
    from lora_studio.core.system.allocator import limit_malloc_arenas

    limit_malloc_arenas()  # as the window's own process
    _lower_priority(0)  # the caller did so already, unless it could not
    outbox = _Outbox(conn)
    root = logging.getLogger()
    root.handlers[:] = [_ForwardingHandler(outbox)]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    cancel = CancelToken()
    threading.Thread(target=_listen_for_cancel, args=(conn, cancel), name="cancel-listener", daemon=True).start()

    def forward(callback_name: str) -> Callable[[Any], None]:
        return lambda value: outbox.send(("callback", callback_name, value))

    kwargs = {callback_name: forward(callback_name) for callback_name in callback_names}
    try:
        result = fn(*args, cancel=cancel, report=lambda p: outbox.send(("report", p)), **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every ending goes back to the caller, who decides how it looks
        outbox.send(("error", _picklable(exc), traceback.format_exc()))
    else:
        outbox.send(("result", result, ""))
    conn.close()


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - a library's exception that cannot cross: its type and text can
        return RuntimeError(f"{type(exc).__name__}: {exc}")
