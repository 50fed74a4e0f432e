"""Where ``sys.getrefcount(None)`` rises in a Qt window that keeps nothing: PySide6's own references.

The soak (``soak_ui.py``) saw the count of references to ``None`` rise by about a thousand a cycle while the objects
the collector tracks stayed level. This measures the binding alone, in a bare QApplication, a few hundred times each:

* a widget made from Python, shown in a layout and deleted (the window does this for rows, result cards, chat turns);
* a plain ``QObject`` made, sent one event, deleted (the first call of a virtual method on a Python-made object);
* ``QTimer.singleShot(ms, loop.quit)`` (a bound slot of a QObject) against one timer started again;
* the same widget made and deleted unshown; one timer started again (a control).

Each figure is the rise of ``sys.getrefcount(None)`` per action after a warm-up, with the tracked objects' count
and the references to ``None`` that objects hold (soak_ui.none_held) beside it, before and after: a rise that no
object holds is a reference the binding took and never gave back, not memory.

    .venv/bin/python benchmarks/pyside_none_refs.py [--reps 300] --json

The JSON line (last): {"pyside6", "python", "per_action": {name: {"none_refs", "none_held", "objects"}}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=300, help="actions measured for each figure")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import PySide6
    from PySide6.QtCore import QCoreApplication, QEvent, QEventLoop, QObject, QTimer
    from PySide6.QtWidgets import QApplication, QCheckBox, QLabel, QVBoxLayout, QWidget
    from soak_ui import none_held

    app = QApplication.instance() or QApplication([])
    host = QWidget()
    layout = QVBoxLayout(host)
    host.show()
    loop = QEventLoop()
    tick = QTimer()
    tick.setSingleShot(True)
    tick.timeout.connect(loop.quit)

    def deleted_now() -> None:  # deleteLater's event, which processEvents() alone leaves for the event loop
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)

    def shown_and_deleted(cls: type) -> Callable[[], None]:
        def action() -> None:
            widget = cls("x")
            layout.addWidget(widget)
            app.processEvents()
            widget.deleteLater()
            deleted_now()

        return action

    def made_and_deleted_unshown() -> None:
        QLabel("x").deleteLater()
        deleted_now()

    def qobject_one_event() -> None:
        QCoreApplication.sendEvent(QObject(), QEvent(QEvent.Type.User))

    def single_shot_bound_slot() -> None:
        QTimer.singleShot(1, loop.quit)
        loop.exec()

    def one_timer_again() -> None:
        tick.start(1)
        loop.exec()

    actions: dict[str, Callable[[], None]] = {
        "QLabel shown in a layout, deleted": shown_and_deleted(QLabel),
        "QCheckBox shown in a layout, deleted": shown_and_deleted(QCheckBox),
        "QObject sent one event, deleted": qobject_one_event,
        "QTimer.singleShot(1, loop.quit)": single_shot_bound_slot,
        "one QTimer started again (control)": one_timer_again,
        "QLabel made and deleted unshown": made_and_deleted_unshown,
    }
    per_action: dict[str, dict[str, float]] = {}
    for name, action in actions.items():
        for _ in range(10):
            action()
        app.processEvents()
        gc.collect()
        objects = gc.get_objects()
        refs, held, count = sys.getrefcount(None), none_held(objects), len(objects)
        del objects
        for _ in range(args.reps):
            action()
        app.processEvents()
        gc.collect()
        objects = gc.get_objects()
        per_action[name] = {
            "none_refs": round((sys.getrefcount(None) - refs) / args.reps, 2),
            "none_held": round((none_held(objects) - held) / args.reps, 2),
            "objects": round((len(objects) - count) / args.reps, 2),
        }
        del objects
        print(f"{name}: {per_action[name]}", file=sys.stderr)
    print(json.dumps({"pyside6": PySide6.__version__, "python": sys.version.split()[0], "per_action": per_action}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
