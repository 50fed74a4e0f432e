"""The window's menus: File (open, the demo, attach, Recent, Quit), View (the docks, Reset layout), Help.

The Recent menu is filled each time it opens, from the settings' recent bases and adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QDockWidget, QMainWindow, QMenu

from lora_studio.gui.base.settings import StudioSettings
from lora_studio.gui.window.help import AboutDialog, ShortcutsDialog


@dataclass(frozen=True)
class MenuActions:
    """What the File menu's entries do (the main window's and its panels' actions)."""

    open_folder: Callable[[], object]
    open_gguf: Callable[[], object]
    open_demo: Callable[[], object]
    attach_folder: Callable[[], object]
    open_base: Callable[[str], object]
    attach_adapter: Callable[[str], object]
    reset_layout: Callable[[], object]


class WindowMenus(QObject):
    def __init__(
        self, window: QMainWindow, actions: MenuActions, docks: Sequence[QDockWidget], settings: StudioSettings
    ) -> None:
        super().__init__(window)
        self.window, self.actions, self.settings = window, actions, settings
        self.shortcuts_dialog: ShortcutsDialog | None = None
        self.about_dialog: AboutDialog | None = None
        bar = window.menuBar()
        file_menu = bar.addMenu("&File")
        act = QAction("Open model &folder…", window, shortcut=QKeySequence(QKeySequence.StandardKey.Open))
        act.triggered.connect(actions.open_folder)
        file_menu.addAction(act)
        act = QAction("Open &GGUF file…", window)
        act.triggered.connect(actions.open_gguf)
        file_menu.addAction(act)
        act = QAction("Open the &demo", window)
        act.setToolTip("the demo model with its pirate, bullets and sql adapters; Train and Compare filled for it")
        act.triggered.connect(actions.open_demo)
        file_menu.addAction(act)
        act = QAction("&Attach adapter folder…", window, shortcut=QKeySequence("Ctrl+A"))
        act.triggered.connect(actions.attach_folder)
        file_menu.addAction(act)
        self.recent_menu = QMenu("&Recent", window)
        self.recent_menu.aboutToShow.connect(self.fill_recent)
        file_menu.addMenu(self.recent_menu)
        file_menu.addSeparator()
        act = QAction("&Quit", window, shortcut=QKeySequence("Ctrl+Q"))  # StandardKey.Quit is empty on some platforms
        act.triggered.connect(window.close)
        file_menu.addAction(act)
        view = bar.addMenu("&View")
        for dock in docks:
            view.addAction(dock.toggleViewAction())
        view.addSeparator()
        act = QAction("&Reset layout", window)
        act.setToolTip("every panel shown and docked, at the sizes of the first start")
        act.triggered.connect(actions.reset_layout)
        view.addAction(act)
        self.reset_layout_action = act
        help_menu = bar.addMenu("&Help")
        act = QAction("&Keyboard shortcuts…", window, shortcut=QKeySequence("Ctrl+/"))
        act.triggered.connect(self.show_shortcuts)
        help_menu.addAction(act)
        act = QAction("&About LoRA Studio…", window)
        act.triggered.connect(self.show_about)
        help_menu.addAction(act)
        self.fill_recent()

    # -- File > Recent -------------------------------------------------------------------------------------------------
    def fill_recent(self) -> None:
        actions, menu = self.actions, self.recent_menu
        menu.clear()
        bases, adapters = self.settings.recent_bases(), self.settings.recent_adapters()
        menu.setToolTipsVisible(True)
        if bases:
            menu.addSection("Base models")
        for path in bases:
            act = menu.addAction(recent_label(path, bases))
            act.setToolTip(path)
            act.setData(path)
            act.triggered.connect(lambda _=False, p=path: actions.open_base(p))
        if adapters:
            menu.addSection("Adapters")
        for path in adapters:
            act = menu.addAction(recent_label(path, adapters))
            act.setToolTip(path)
            act.setData(path)
            act.triggered.connect(lambda _=False, p=path: actions.attach_adapter(p))
        if not bases and not adapters:
            menu.addAction("(nothing yet)").setEnabled(False)
        else:
            menu.addSeparator()
            menu.addAction("Clear recent", self.clear_recent)

    def clear_recent(self) -> None:
        self.settings.clear_recent()
        self.fill_recent()

    # -- Help ----------------------------------------------------------------------------------------------------------
    def show_shortcuts(self) -> None:
        self.shortcuts_dialog = ShortcutsDialog(self.window)
        self.shortcuts_dialog.show()

    def show_about(self) -> None:
        self.about_dialog = AboutDialog(self.window)
        self.about_dialog.show()


def recent_label(path: str, among: list[str]) -> str:
    """A recent entry's name, with its folder where another entry has the same name (two adapters called "pirate"
    from two folders must read differently)."""
    name = Path(path).name or path
    if sum(1 for other in among if (Path(other).name or other) == name) > 1:
        return f"{name} — {Path(path).parent}"
    return name
