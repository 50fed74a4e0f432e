"""The Help menu's two dialogs: the keyboard shortcuts of the window, and About (versions, log file, data folder).

The shortcut list is read from the window itself (every QAction and QShortcut that has a key), so a panel's
new shortcut appears here without a list to keep up to date; a QShortcut says what it does in its whatsThis.
"""

from __future__ import annotations

from html import escape

from PySide6.QtCore import QObject, Qt, qVersion
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QGroupBox,
    QHeaderView,
    QLabel,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from lora_studio.app_logging import current_log_path
from lora_studio.core.io.paths import data_dir
from lora_studio.core.system.versions import versions

# what the mouse does, beside the keys (not shortcuts Qt knows about)
MOUSE_ACTIONS = (
    ("Double-click a model under “On this machine”", "load it"),
    ("Double-click an adapter", "make it the active adapter"),
    ("Drop a model folder, a .gguf or an adapter folder on the window", "load the model / attach the adapter"),
)


def _plain(text: str) -> str:
    """A menu text without its mnemonic '&' and trailing '…'."""
    return text.replace("&&", "\0").replace("&", "").replace("\0", "&").rstrip("…").strip()


def _context(widget: QObject | None) -> str:
    """Where a shortcut works: the title of the nearest group box, else the tab holding it ("" for the window)."""
    while widget is not None:
        if isinstance(widget, QGroupBox) and widget.title():
            return _plain(widget.title())
        parent = widget.parent()
        tabs = parent.parent() if isinstance(parent, QStackedWidget) else None
        if isinstance(tabs, QTabWidget) and isinstance(widget, QWidget):
            return _plain(tabs.tabText(tabs.indexOf(widget)))
        widget = parent
    return ""


def window_shortcuts(window: QWidget) -> list[tuple[str, str]]:
    """[(keys, what they do)] of every action and shortcut in the window that has a key, sorted by what they do.

    Keys doing the same thing share a row ("Ctrl+Return or Ctrl+Enter"). A QShortcut is described by its whatsThis,
    else by where it works ("in Compare").
    """
    found: dict[str, list[str]] = {}
    for action in window.findChildren(QAction):
        keys = action.shortcut().toString(QKeySequence.SequenceFormat.NativeText)
        if keys and action.text():
            found.setdefault(_plain(action.text()), []).append(keys)
    for shortcut in window.findChildren(QShortcut):
        keys = shortcut.key().toString(QKeySequence.SequenceFormat.NativeText)
        context = _context(shortcut.parent())
        what = shortcut.whatsThis() or (f"run, in {context}" if context else "")
        if keys and what and keys not in found.setdefault(what, []):
            found[what].append(keys)
    rows = [(" or ".join(keys), what) for what, keys in found.items() if keys]
    return sorted(rows, key=lambda row: row[1].lower())


class ShortcutsDialog(QDialog):
    """A two-column table: the keys, and what they do (and what double-click and drop do)."""

    def __init__(self, window: QWidget) -> None:
        super().__init__(window)
        self.setWindowTitle("Keyboard shortcuts")
        self.rows = [*window_shortcuts(window), *MOUSE_ACTIONS]
        table = QTableWidget(len(self.rows), 2)
        table.setHorizontalHeaderLabels(["Keys", "Does"])
        table.verticalHeader().hide()
        table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        table.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        for row, (keys, what) in enumerate(self.rows):
            table.setItem(row, 0, QTableWidgetItem(keys))
            table.setItem(row, 1, QTableWidgetItem(what))
        table.setWordWrap(True)
        table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        table.setColumnWidth(0, 250)  # the keys, or a mouse action wrapped over two lines
        table.horizontalHeader().setStretchLastSection(True)
        table.resizeRowsToContents()
        self.table = table
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(table)
        layout.addWidget(buttons)
        self.resize(620, 420)


def about_rows() -> list[tuple[str, str]]:
    """[(what, value)] About shows: versions (Qt's runtime too), the log file and the data folder."""
    from PySide6 import __version__ as pyside_version

    rows = [(name, version) for name, version in versions()]
    rows = [(name, pyside_version if name == "PySide6" else version) for name, version in rows]
    rows.append(("Qt", qVersion()))
    log = current_log_path()
    rows.append(("Log file", str(log) if log is not None else "none (logging to a file is off)"))
    rows.append(("Data folder", str(data_dir())))
    return rows


class AboutDialog(QDialog):
    """What this is, what it runs on, and where its files are (selectable, to paste into a bug report)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("About LoRA Studio")
        self.rows = about_rows()
        table = "".join(
            f"<tr><td style='padding-right:12px'><b>{escape(k)}</b></td><td>{escape(v)}</td></tr>" for k, v in self.rows
        )
        self.text = QLabel(
            "<h3>LoRA Studio</h3><p>Train LoRA adapters, judge them (compare, chat, evaluate, scale, reduce) and "
            "ship them (merge, export to GGUF) on your own models."
            f"</p><table>{table}</table>"
        )
        self.text.setTextFormat(Qt.TextFormat.RichText)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.text)
        layout.addWidget(buttons)
