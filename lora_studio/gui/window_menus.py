"""The window's menus: File (open, attach, Recent, Quit), View (the docks), Help (shortcuts, About).

The Recent menu is filled each time it opens, from the settings' recent bases and adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMenu

if TYPE_CHECKING:
    from lora_studio.gui.help_dialogs import AboutDialog, ShortcutsDialog
    from lora_studio.gui.main_window import MainWindow


class WindowMenus(QObject):
    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.shortcuts_dialog: ShortcutsDialog | None = None
        self.about_dialog: AboutDialog | None = None
        bar = window.menuBar()
        file_menu = bar.addMenu("&File")
        act = QAction("Open model &folder…", window, shortcut=QKeySequence(QKeySequence.StandardKey.Open))
        act.triggered.connect(window.model_panel.browse_folder)
        file_menu.addAction(act)
        act = QAction("Open &GGUF file…", window)
        act.triggered.connect(window.model_panel.browse_gguf)
        file_menu.addAction(act)
        act = QAction("&Attach adapter folder…", window, shortcut=QKeySequence("Ctrl+A"))
        act.triggered.connect(window.adapter_panel.browse_attach)
        file_menu.addAction(act)
        self.recent_menu = QMenu("&Recent", window)
        self.recent_menu.aboutToShow.connect(self.fill_recent)
        file_menu.addMenu(self.recent_menu)
        file_menu.addSeparator()
        act = QAction("&Quit", window, shortcut=QKeySequence("Ctrl+Q"))  # StandardKey.Quit is empty on some platforms
        act.triggered.connect(window.close)
        file_menu.addAction(act)
        view = bar.addMenu("&View")
        for dock in (window.model_dock, window.memory_dock, window.log_dock):
            view.addAction(dock.toggleViewAction())
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
        window, menu = self.window, self.recent_menu
        menu.clear()
        bases, adapters = window.settings.recent_bases(), window.settings.recent_adapters()
        if bases:
            menu.addSection("Base models")
        for path in bases:
            act = menu.addAction(Path(path).name or path)
            act.setToolTip(path)
            act.setData(path)
            act.triggered.connect(lambda _=False, p=path: window.open_base(p))
        if adapters:
            menu.addSection("Adapters")
        for path in adapters:
            act = menu.addAction(Path(path).name or path)
            act.setData(path)
            act.triggered.connect(lambda _=False, p=path: window.attach_adapter(p))
        if not bases and not adapters:
            menu.addAction("(nothing yet)").setEnabled(False)
        else:
            menu.addSeparator()
            menu.addAction("Clear recent", self.clear_recent)

    def clear_recent(self) -> None:
        self.window.settings.clear_recent()
        self.fill_recent()

    # -- Help ----------------------------------------------------------------------------------------------------------
    def show_shortcuts(self) -> None:
        from lora_studio.gui.help_dialogs import ShortcutsDialog

        self.shortcuts_dialog = ShortcutsDialog(self.window)
        self.shortcuts_dialog.show()

    def show_about(self) -> None:
        from lora_studio.gui.help_dialogs import AboutDialog

        self.about_dialog = AboutDialog(self.window)
        self.about_dialog.show()
