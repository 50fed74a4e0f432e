"""``lora-studio`` without a subcommand: the window. Kept light so the window shows fast.

torch/transformers/peft are imported by the first job that needs them, on a worker
thread, never on the way to the first paint.
"""

from __future__ import annotations

import os
import sys
import time

STARTUP_ENV = "LORA_STUDIO_STARTUP_REPORT"  # set by the benchmark: print startup time and quit


def run_app(demo: bool = False, base: str | None = None) -> int:
    from PySide6.QtCore import QTimer
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from lora_studio.app_logging import setup_logging
    from lora_studio.core.demo.assets import icon_path
    from lora_studio.gui.window.main_window import MainWindow

    setup_logging("window")
    existing = QApplication.instance()
    assert existing is None or isinstance(existing, QApplication)  # this process only ever makes a QApplication
    app = existing or QApplication(sys.argv[:1])
    app.setApplicationName("LoRA Studio")
    app.setOrganizationName("LoRA Studio")
    app.setDesktopFileName("lora-studio")
    icon = icon_path("png") or icon_path("svg")
    if icon is not None:
        app.setWindowIcon(QIcon(str(icon)))
    window = MainWindow()
    window.show()
    if os.environ.get(STARTUP_ENV):

        def report() -> None:
            import psutil

            started = psutil.Process().create_time()
            print(f"window-shown {(window.shown_at or time.time()) - started:.3f}", flush=True)
            window.close()
            app.quit()

        QTimer.singleShot(200, report)
    elif demo:
        QTimer.singleShot(0, window.load_demo)
    elif base:
        QTimer.singleShot(0, lambda: window.open_base(base))
    return int(app.exec())
