"""What the window remembers between runs: recent models and adapters, geometry, panel layout.

Stored with QSettings as an INI file in the app's data directory (LORA_STUDIO_DATA_DIR
moves it, so tests never touch the user's real settings).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

from lora_studio.core.io.paths import data_dir

MAX_RECENT = 10
RECENT_BASES = "recent/bases"
RECENT_ADAPTERS = "recent/adapters"


class StudioSettings:
    def __init__(self, path: Path | None = None) -> None:
        path = path or (data_dir() / "window.ini")
        self.path = Path(path)
        self._qs = QSettings(str(self.path), QSettings.Format.IniFormat)

    # -- recent lists -------------------------------------------------------------------------------------------------
    def _list(self, key: str) -> list[str]:
        value = self._qs.value(key, [])
        if isinstance(value, str):  # QSettings returns a lone string for a one-item list
            value = [value]
        elif not isinstance(value, list):  # None: no such key
            value = []
        return [str(v) for v in value if str(v)]

    def recent_bases(self) -> list[str]:
        return self._list(RECENT_BASES)

    def recent_adapters(self) -> list[str]:
        return self._list(RECENT_ADAPTERS)

    def _push(self, key: str, path: str) -> None:
        items = [p for p in self._list(key) if p != path]
        # no sync() here: this runs as a job ends, maybe while the disk is busy, and sync() fsyncs holding the GIL
        # (45 ms once). Qt writes the change from the event loop shortly after, and save_window() syncs on close.
        self._qs.setValue(key, [path, *items][:MAX_RECENT])

    def add_recent_base(self, path: str) -> None:
        self._push(RECENT_BASES, str(path))

    def add_recent_adapter(self, path: str) -> None:
        self._push(RECENT_ADAPTERS, str(path))

    def forget(self, path: str) -> None:
        for key in (RECENT_BASES, RECENT_ADAPTERS):
            self._qs.setValue(key, [p for p in self._list(key) if p != path])
        self._qs.sync()

    def clear_recent(self) -> None:
        self._qs.remove("recent")
        self._qs.sync()

    # -- last-used folders, one per kind of file dialog ("adapter", "model", "prompts", "merged", ...) -----------------
    def last_folder(self, kind: str) -> str | None:
        """The folder the last dialog of this kind ended in, if it still exists."""
        value = self._qs.value(f"last_folder/{kind}")
        return str(value) if value and Path(str(value)).is_dir() else None

    def remember_folder(self, kind: str, path: str) -> None:
        """Remember where a dialog of this kind ended: the folder holding what was chosen (a file or a folder),
        so the next dialog opens beside it (the sibling adapter, the next prompt file)."""
        self._qs.setValue(f"last_folder/{kind}", str(Path(path).parent))  # no sync(): see _push

    # -- window -------------------------------------------------------------------------------------------------------
    def save_window(self, geometry: QByteArray, state: QByteArray) -> None:
        self._qs.setValue("window/geometry", geometry)
        self._qs.setValue("window/state", state)
        self._qs.sync()

    def window_geometry(self) -> QByteArray | None:
        value = self._qs.value("window/geometry")
        return value if isinstance(value, QByteArray) and not value.isEmpty() else None

    def window_state(self) -> QByteArray | None:
        value = self._qs.value("window/state")
        return value if isinstance(value, QByteArray) and not value.isEmpty() else None

    def value(self, key: str, default: object = None) -> object:
        return self._qs.value(key, default)

    def set_value(self, key: str, value: object) -> None:
        self._qs.setValue(key, value)
        self._qs.sync()
