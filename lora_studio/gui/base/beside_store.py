"""The merged models loaded read-only beside the session (gigabytes each), in one store the window owns.

The Compare tab adds and removes them (Add merged folder…, the Merge tab's "Compare merged vs adapter") and shows
them as columns; the Evaluate tab scores them. Each is an opaque reference: the GUI thread never calls into it, it
travels from the job that loaded it to the jobs that run it, and the last reference is dropped on a worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Signal

if TYPE_CHECKING:
    from lora_studio.core.compare import BesideModel


class BesideModels(QObject):
    """Column name -> merged model loaded beside the session, with the folder it came from."""

    changed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._models: dict[str, BesideModel] = {}
        self._paths: dict[str, str] = {}

    @property
    def models(self) -> Mapping[str, BesideModel]:
        """Column name -> model, in the order they were loaded (a read-only view)."""
        return self._models

    def names(self) -> list[str]:
        return list(self._models)

    def path(self, name: str) -> str:
        """The folder the model named ``name`` was loaded from ('' when there is none)."""
        return self._paths.get(name, "")

    def named_for(self, path: str) -> str | None:
        """The column name of the folder at ``path`` when it is already loaded beside the session."""
        return next((name for name, held in self._paths.items() if held == path and name in self._models), None)

    def add(self, name: str, model: BesideModel, path: str) -> None:
        self._models[name] = model
        self._paths[name] = path
        self.changed.emit()

    def take(self, names: Iterable[str] | None = None) -> list[BesideModel]:
        """Forget models (all of them by default); returns their references for the caller to release."""
        chosen = list(self._models) if names is None else list(names)
        held = [self._models.pop(n) for n in chosen if n in self._models]
        for n in chosen:
            self._paths.pop(n, None)
        if held:
            self.changed.emit()
        return held
