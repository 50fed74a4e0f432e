"""What every long core job takes: a cancel token and a progress report.

Long jobs have the shape ``fn(..., *, cancel, report) -> result``. They call
``cancel.raise_if_cancelled()`` at safe points and ``report(Progress(...))`` as
work is done. Neither knows about threads or Qt: the window's worker adapts them
to signals, the CLI to a terminal line, tests to lists.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from lora_studio.core.errors import Cancelled

_COUNTS = re.compile(r"\s*\d[\d,.]*(?:\s*/\s*\d[\d,.]*)?")


_COUNT = re.compile(r"\d[\d,]*\s*/\s*\d[\d,]*")  # "26/36", "1,024 / 2,048"


def stage_of(message: str) -> str:
    """The stage a message names: the message without its counts ("merging tensor 5/272" -> "merging tensor")."""
    return _COUNTS.sub("", message).strip()


@dataclass(frozen=True)
class Progress:
    """One report of a long job. ``stage`` names the step it is in; a front end that drops reports to keep up
    drops only repeats of one stage, never the first report of a new one."""

    done: float = 0
    total: float | None = None  # None: indeterminate
    message: str = ""
    unit: str = ""  # "tensors", "tokens", "bytes", ... for display
    stage: str = ""  # "" : derived from the message (its words without the counts)

    def __post_init__(self) -> None:
        if not self.stage:
            object.__setattr__(self, "stage", stage_of(self.message))

    @property
    def counted(self) -> bool:
        """Whether the message carries a count of its own ("layer 5/120"): a front end then shows no second one."""
        return _COUNT.search(self.message) is not None

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))


Report = Callable[[Progress], None]


def no_report(_: Progress) -> None:
    """The report used when a caller does not want progress."""


class CancelToken:
    """Thread-safe flag a front end sets and a job polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


def never_cancelled() -> CancelToken:
    """A fresh token nobody will set, for callers without a Stop button."""
    return CancelToken()
