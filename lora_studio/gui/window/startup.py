"""Work done once after the window shows, off the GUI thread: library imports and the GC freeze after them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Qt, Signal

if TYPE_CHECKING:
    from lora_studio.core.tasks import CancelToken, Report


def warm_up(*, cancel: CancelToken, report: Report, safe_to_freeze: Callable[[], bool] = lambda: True) -> None:
    """Import torch/transformers/peft on a worker while the user looks around, then freeze the GC.

    After gc.freeze() the hundreds of thousands of objects these imports create are
    no longer scanned by each gc.collect() (the core collects after every unload):
    a full collection drops from ~0.3 s to a few ms, and it holds the GIL, i.e. it
    would freeze the window for that long.
    """
    import gc

    for name in ("torch", "transformers", "peft"):
        cancel.raise_if_cancelled()
        __import__(name)
    from transformers import AutoModelForCausalLM  # noqa: F401 - the lazy module a load needs first

    # Only while no model exists or is being built: frozen objects are never cycle-collected.
    if safe_to_freeze():
        gc.freeze()


class Preloader(QObject):
    """Imports a slow module (pyqtgraph: ~1 s) on a daemon thread, then says so on the GUI thread."""

    ready = Signal()
    _done = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._done.connect(self.ready, Qt.ConnectionType.QueuedConnection)

    def start(self, module: str) -> None:
        import importlib
        import threading

        def run() -> None:
            try:
                importlib.import_module(module)
            finally:
                self._done.emit()

        threading.Thread(target=run, name=f"preload-{module}", daemon=True).start()
