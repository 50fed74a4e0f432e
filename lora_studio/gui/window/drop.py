"""Drag and drop onto the window: a model folder or .gguf loads as the base, an adapter folder is attached.

Adapters dropped with a base are attached after the base has loaded, one after the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PySide6.QtCore import QTimer

if TYPE_CHECKING:
    from PySide6.QtCore import QMimeData

    from lora_studio.gui.base.jobs import Job


class DropTarget(Protocol):
    """What a drop asks of the window (the MainWindow is one)."""

    def open_base(self, path: str) -> Job | None: ...
    def attach_adapter(self, path: str) -> Job | None: ...
    def show_error(self, message: str) -> None: ...


def drop_kind(path: Path) -> str | None:
    """What a dropped path is: 'adapter', 'base', or None."""
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return "adapter"
    if path.is_file() and path.name == "adapter_config.json":
        return "adapter"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "base"
    if path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.gguf"))):
        return "base"
    if path.is_file() and path.name == "config.json":
        return "base"
    return None


def dropped_paths(mime: QMimeData) -> list[Path]:
    """The local files and folders of a drag."""
    return [Path(u.toLocalFile()) for u in mime.urls() if u.isLocalFile()]


def accepts(mime: QMimeData) -> bool:
    """Whether a drag holds something the window opens (a drag of anything else is not accepted)."""
    return any(drop_kind(path) for path in dropped_paths(mime))


def handle_drop(window: DropTarget, paths: list[Path]) -> None:
    """A model folder or .gguf loads as the base; an adapter folder is attached (queued after a base load)."""
    bases = [p for p in paths if drop_kind(p) == "base"]
    adapters = [p.parent if p.is_file() else p for p in paths if drop_kind(p) == "adapter"]
    if not bases and not adapters:
        window.show_error("drop a model folder, a .gguf file, or a LoRA adapter folder")
        return
    if bases:
        job = window.open_base(str(bases[0]))
        if job is not None and adapters:
            job.finished.connect(lambda _: attach_in_turn(window, list(adapters)))
        return
    attach_in_turn(window, adapters)


def attach_in_turn(window: DropTarget, folders: list[Path]) -> None:
    """Attach ``folders`` one after the other, each once the one before it has been attached."""
    if not folders:
        return
    job = window.attach_adapter(str(folders[0]))
    if job is not None and folders[1:]:
        job.finished.connect(lambda _: QTimer.singleShot(0, lambda: attach_in_turn(window, folders[1:])))
