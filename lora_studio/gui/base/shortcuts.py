"""The one "run" key of a box or tab: Ctrl+Enter anywhere in it (Return on the main keyboard, Enter on the keypad).

Help > Keyboard shortcuts lists these from the enclosing group box or tab (see help_dialogs.py).
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import QWidget

RUN_KEYS = ("Ctrl+Return", "Ctrl+Enter")


def add_run_shortcuts(widget: QWidget, slot: Callable[[], object]) -> list[QShortcut]:
    """Ctrl+Enter runs ``slot`` while the focus is anywhere in ``widget`` (its children included)."""
    shortcuts = [QShortcut(QKeySequence(keys), widget) for keys in RUN_KEYS]
    for shortcut in shortcuts:
        shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        shortcut.activated.connect(slot)
    return shortcuts
