"""While a window lives, cycle collection happens on the GUI thread only."""

from __future__ import annotations

import gc
import threading

from PySide6.QtWidgets import QWidget

from lora_studio.core.system import garbage
from lora_studio.gui.base.gc_guard import GuiThreadGarbageCollector


def test_worker_collections_run_on_the_gui_thread_and_gc_comes_back(qtbot):
    owner = QWidget()
    qtbot.addWidget(owner)
    was_enabled = gc.isenabled()
    guard = GuiThreadGarbageCollector(owner)
    assert not gc.isenabled()  # no automatic collection on whatever thread allocates
    ran_on = []
    gc.callbacks.append(lambda phase, info: phase == "start" and ran_on.append(threading.current_thread()))
    try:
        worker = threading.Thread(target=garbage.collect)
        worker.start()
        qtbot.waitUntil(lambda: not worker.is_alive(), timeout=10_000)
        worker.join()
    finally:
        gc.callbacks.pop()
        guard.close()
    assert ran_on and all(t is threading.main_thread() for t in ran_on)
    assert gc.isenabled() == was_enabled and garbage._collector is None
