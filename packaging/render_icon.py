"""Render resources/icons/lora-studio.svg to PNG (run after editing the SVG).

QT_QPA_PLATFORM=offscreen .venv/bin/python packaging/render_icon.py
"""

import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"


def render(size: int, out: Path) -> None:
    renderer = QSvgRenderer(str(ICONS / "lora-studio.svg"))
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    if not image.save(str(out)):
        raise SystemExit(f"could not write {out}")


if __name__ == "__main__":
    app = QGuiApplication(sys.argv)
    render(256, ICONS / "lora-studio.png")
    print(ICONS / "lora-studio.png")
