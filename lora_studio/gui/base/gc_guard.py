"""Garbage collection only on the GUI thread.

Python collects cycles on whichever thread happens to allocate; when that is a worker
and the cycle holds the wrapper of a dead widget, Qt destroys the widget off its thread
and can abort the process. So while a window lives, automatic collection is off, a timer
collects on the GUI thread (the same generation thresholds Python uses), and the core's
explicit collections (after an unload) are handed to the GUI thread and waited for.
"""

from __future__ import annotations

import gc
import threading

from PySide6.QtCore import QObject, Qt, QTimer, Signal, Slot

from lora_studio.core.system import garbage

# Often enough that each collection is small: checked every 500 ms, a young generation had grown to 30-50k
# objects during a load (10-40 ms per collection, on the GUI thread).
CHECK_INTERVAL_MS = 100
WORKER_WAIT_S = 5.0  # a worker asking for a collection waits this long, then goes on without one


class GuiThreadGarbageCollector(QObject):
    _requested = Signal(object)  # a threading.Event to set when done

    _active = 0  # windows alive; automatic collection comes back when the last one goes
    _was_enabled = True

    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)
        self._gui_thread = threading.current_thread()
        self._requested.connect(self._collect_for_worker, Qt.ConnectionType.QueuedConnection)
        if GuiThreadGarbageCollector._active == 0:
            GuiThreadGarbageCollector._was_enabled = gc.isenabled()
        self._previous = garbage.set_collector(self.collect)
        GuiThreadGarbageCollector._active += 1
        gc.disable()
        self._timer = QTimer(self)
        self._timer.setInterval(CHECK_INTERVAL_MS)
        self._timer.timeout.connect(self._check)
        self._timer.start()
        self._closed = False

    def collect(self) -> None:
        """A full collection on the GUI thread; from a worker, ask for one and wait (bounded)."""
        if threading.current_thread() is self._gui_thread or self._closed:
            gc.collect()
            return
        done = threading.Event()
        self._requested.emit(done)
        done.wait(WORKER_WAIT_S)  # the GUI thread may be waiting for this worker (shutdown): never deadlock

    @Slot(object)
    def _collect_for_worker(self, done: threading.Event) -> None:
        try:
            gc.collect()
        finally:
            done.set()

    def _check(self) -> None:
        # Python's own thresholds, just run here: young generations often, the old one rarely.
        counts, thresholds = gc.get_count(), gc.get_threshold()
        for generation in (2, 1, 0):
            if counts[generation] > thresholds[generation]:
                gc.collect(generation)
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.stop()
        gc.collect()  # dead widgets die here, on the GUI thread, before anyone else may collect
        GuiThreadGarbageCollector._active -= 1
        if garbage._collector == self.collect:
            garbage.set_collector(self._previous if GuiThreadGarbageCollector._active else None)
        if GuiThreadGarbageCollector._active == 0 and GuiThreadGarbageCollector._was_enabled:
            gc.enable()
