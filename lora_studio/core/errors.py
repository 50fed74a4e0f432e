"""Typed errors and the one place that decides how an error looks to a user.

Every front end (window, CLI) calls :func:`describe` and nothing else to turn an
exception into words, so a message reads the same wherever it surfaces.
"""

from __future__ import annotations

import errno
import os
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

# How an error is shown: a user's mistake, a stop on request, memory ran out, or a bug.
ErrorKind = Literal["user", "cancelled", "oom", "internal"]


class StudioError(Exception):
    """Base class of the errors LoRA Studio raises on purpose."""


class UserError(StudioError):
    """Bad input the user can fix: says what is wrong and what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[Callable[..., UserError], tuple[type[UserError], str, str, dict[str, Any]]]:
        # the hint and a subclass's own fields survive pickling (a job in a worker process raises them here)
        return _rebuild_user_error, (type(self), self.message, self.hint, dict(self.__dict__))


def _rebuild_user_error(cls: type[UserError], message: str, hint: str, fields: dict) -> UserError:
    error = cls.__new__(cls)
    UserError.__init__(error, message, hint)
    error.__dict__.update(fields)
    return error


class Cancelled(StudioError):
    """The user asked a long job to stop; not a failure."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


class OutOfMemory(UserError):
    """Memory ran out (CPU RAM or an accelerator)."""


@dataclass(frozen=True)
class ErrorDescription:
    kind: ErrorKind
    message: str  # one line, shown in the window or on stderr
    detail: str  # the full story (traceback for internal errors), for the log


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception says memory ran out (MemoryError, torch's OutOfMemoryError, a CUDA message)."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()[:200]


def describe(exc: BaseException) -> ErrorDescription:
    """How an exception is shown: one clear line plus details for the log."""
    detail = "".join(traceback.format_exception(exc))
    if isinstance(exc, Cancelled):
        return ErrorDescription("cancelled", str(exc) or "cancelled", detail)
    if isinstance(exc, OutOfMemory):
        return ErrorDescription("oom", _one_line(str(exc)), detail)
    if isinstance(exc, UserError):
        return ErrorDescription("user", _one_line(str(exc)), detail)
    if is_out_of_memory(exc):
        return ErrorDescription(
            "oom",
            "out of memory: "
            + _one_line(str(exc) or type(exc).__name__)
            + " (choose a smaller dtype, another device, or close other programs)",
            detail,
        )
    if isinstance(exc, KeyboardInterrupt):
        return ErrorDescription("cancelled", "interrupted", detail)
    if isinstance(exc, OSError) and exc.errno in SYSTEM_REFUSALS:
        # what the system refused of a path the user gave (a name too long, a full or read-only disk): bad input
        where = f": {_elided(os.fsdecode(exc.filename))}" if exc.filename else ""
        return ErrorDescription("user", f"{SYSTEM_REFUSALS[exc.errno]}{where}", detail)
    if isinstance(exc, UnicodeEncodeError) and "surrogate" in str(exc):
        return ErrorDescription(
            "user",
            "a file or folder name holds bytes that are not UTF-8, which the files LoRA Studio writes cannot name "
            "(rename it)",
            detail,
        )
    text = _one_line(str(exc)) or type(exc).__name__
    return ErrorDescription("internal", f"internal error: {type(exc).__name__}: {text}", detail)


SYSTEM_REFUSALS = {
    errno.ENAMETOOLONG: "a file name is too long for the file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOTDIR: "a folder on the path is a file",
}


def _elided(path: str, limit: int = 120) -> str:
    return path if len(path) <= limit else path[: limit // 2 - 1] + "…" + path[-(limit // 2) :]


def first_and_more(items: list[str]) -> str:
    """How a refusal names what it found: "model.layers.0.q_proj", or "model.layers.0.q_proj and 3 more"."""
    return items[0] + (f" and {len(items) - 1} more" if len(items) > 1 else "")


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
