"""Cycle collection that a front end can route to one thread.

Qt objects must die on the thread that owns them. A ``gc.collect()`` on a worker thread
can finalise the Python wrapper of a dead widget there and abort Qt, so a window turns
off automatic collection and installs a collector that runs on its GUI thread
(pyqtgraph's GarbageCollector idea). The core only ever calls :func:`collect`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

_collector: Callable[[], None] | None = None


def set_collector(fn: Callable[[], None] | None) -> Callable[[], None] | None:
    """Install ``fn`` as the way to collect (None: plain gc.collect); returns the previous one."""
    global _collector
    previous, _collector = _collector, fn
    return previous


def collect() -> None:
    """Collect reference cycles (freed model tensors often sit in them), on the thread the front end chose."""
    (_collector or gc.collect)()
