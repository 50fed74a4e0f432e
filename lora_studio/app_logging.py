"""The log file: what the window and the CLI did, for a bug report.

The package logs through :mod:`logging` (``logging.getLogger(__name__)`` everywhere). A front end calls
:func:`setup_logging` once: records go to a rotating file in the data directory, ``logs/lora-studio.log``
(1 MiB, 3 old files kept; ``LORA_STUDIO_LOG_DIR`` puts it elsewhere). ``LORA_STUDIO_DEBUG=1`` lowers the level
from INFO to DEBUG. Nothing is printed to the terminal by this handler: the CLI's one-line error policy stays as
it is.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

LOG_NAME = "lora-studio.log"
MAX_BYTES = 1024 * 1024
BACKUPS = 3
DEBUG_ENV = "LORA_STUDIO_DEBUG"
LOG_DIR_ENV = "LORA_STUDIO_LOG_DIR"  # another folder for the log (tests, portable installs)
_FORMAT = "%(asctime)s %(levelname)-7s %(threadName)s %(name)s: %(message)s"
# libraries that log warnings of their own (bitsandbytes at import, imported by PEFT, on a CPU without its optional
# kernels package; accelerate placing a model, "Some parameters are on the meta device…"): their records go to the
# log file, not to the terminal through logging's last resort
LIBRARY_LOGGERS = ("bitsandbytes", "accelerate")

_handler: logging.Handler | None = None


def log_path(*, create: bool = True) -> Path:
    """Where the log file is (the folder is created unless ``create`` is False; the file may not exist yet)."""
    override = os.environ.get(LOG_DIR_ENV)
    if override:
        folder = Path(override)
    else:
        from lora_studio.core.io.paths import data_dir

        folder = data_dir(create=create) / "logs"
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder / LOG_NAME


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def setup_logging(front_end: str) -> Path | None:
    """Route the package's log records to the rotating file; returns its path (None if it cannot be written).

    Idempotent: a second call keeps the first handler. A log file that cannot be opened (read-only data folder)
    costs the log, never the program.
    """
    global _handler
    package = logging.getLogger("lora_studio")
    level = logging.DEBUG if debug_enabled() else logging.INFO
    package.setLevel(level)
    if _handler is not None:
        return current_log_path()
    try:
        path = log_path()
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            # a path of bytes that are not UTF-8 is logged escaped, not as logging's own traceback on stderr
            path,
            maxBytes=MAX_BYTES,
            backupCount=BACKUPS,
            encoding="utf-8",
            delay=True,
            errors="backslashreplace",
        )
    except OSError:
        _route_libraries(logging.NullHandler())
        return None
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(level)
    package.addHandler(handler)
    _route_libraries(handler)
    _handler = handler
    logging.getLogger(__name__).info("%s started (pid %d, LoRA Studio %s)", front_end, os.getpid(), _version())
    return path


def _route_libraries(handler: logging.Handler) -> None:
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.addHandler(handler)
        library.propagate = False


def current_log_path() -> Path | None:
    """The file that :func:`setup_logging` opened, or None before it ran (or when it could not)."""
    return Path(_handler.baseFilename) if isinstance(_handler, logging.FileHandler) else None


def _version() -> str:
    from lora_studio import __version__

    return __version__
