"""Which system libraries Qt's window needs and this machine lacks, and installing them (Debian/Ubuntu).

PySide6's wheels bring Qt but not every library Qt's xcb platform plugin links against; Qt's own message then
names only one of them ("xcb-cursor0 or libxcb-cursor0 is needed") while others (libxcb-icccm4, libxcb-keysyms1,
...) are missing too. This module asks ``ldd`` about the plugin and the Qt libraries it loads, maps each missing
library to its Debian package, and installs them with apt-get when it runs as root; otherwise it prints the one
command that does. It imports no Qt (Qt is what may fail to load).

    python -m lora_studio.qt_system_libs [--install]     # exit 0: nothing missing (or all installed)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

# soname -> Debian package, for the libraries Qt 6's xcb plugin and its Gui/Widgets/DBus libraries need.
DEBIAN_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xinput.so.0": "libxcb-xinput0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-glx.so.0": "libxcb-glx0",
    "libxcb.so.1": "libxcb1",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libGLX.so.0": "libglx0",
    "libOpenGL.so.0": "libopengl0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libSM.so.6": "libsm6",
    "libICE.so.6": "libice6",
}
# What the window needs beyond the libraries ldd names (Qt loads these at run time).
RUNTIME_PACKAGES = ("fonts-dejavu-core",)
QT_LIBRARIES = ("libQt6Core.so.6", "libQt6Gui.so.6", "libQt6Widgets.so.6", "libQt6DBus.so.6", "libQt6XcbQpa.so.6")


def qt_folder() -> Path | None:
    """PySide6's Qt folder, found without importing PySide6."""
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "Qt"
    return folder if folder.is_dir() else None


def binaries(qt: Path) -> list[Path]:
    found = [qt / "plugins" / "platforms" / "libqxcb.so"] + [qt / "lib" / name for name in QT_LIBRARIES]
    return [p for p in found if p.is_file()]


def parse_ldd(text: str) -> list[str]:
    """The sonames ``ldd`` reports as "not found"."""
    return [line.split("=>")[0].strip() for line in text.splitlines() if "=> not found" in line]


def missing_libraries(qt: Path | None = None) -> list[str]:
    qt = qt or qt_folder()
    if qt is None or shutil.which("ldd") is None:
        return []
    missing: set[str] = set()
    env = dict(os.environ, LD_LIBRARY_PATH=f"{qt / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    for binary in binaries(qt):
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, timeout=30)
        missing.update(parse_ldd(out.stdout))
    return sorted(missing)


def packages_for(libraries: list[str]) -> tuple[list[str], list[str]]:
    """(Debian packages to install, libraries no package is known for)."""
    packages = sorted({DEBIAN_PACKAGES[lib] for lib in libraries if lib in DEBIAN_PACKAGES})
    unknown = [lib for lib in libraries if lib not in DEBIAN_PACKAGES]
    return packages, unknown


def install_command(packages: list[str]) -> str:
    return f"sudo apt-get update && sudo apt-get install -y {' '.join(packages)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_studio.qt_system_libs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="install what is missing with apt-get (as root)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        return 0
    missing = missing_libraries()
    if not missing:
        return 0
    packages, unknown = packages_for(missing)
    print(f"lora-studio: Qt's window needs system libraries that are missing: {', '.join(missing)}", file=sys.stderr)
    if unknown:
        print(
            f"lora-studio: no Debian package is known for {', '.join(unknown)}; install it with your package manager",
            file=sys.stderr,
        )
    if not packages:
        return 1
    can_install = args.install and shutil.which("apt-get") is not None and os.geteuid() == 0
    if not can_install:
        print(f"lora-studio: install them with: {install_command(packages + list(RUNTIME_PACKAGES))}", file=sys.stderr)
        return 1
    print(f"lora-studio: installing {' '.join(packages)} with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, stdout=subprocess.DEVNULL)
    done = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, *RUNTIME_PACKAGES],
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
    )
    still = missing_libraries()
    if done.returncode != 0 or still:
        print(
            f"lora-studio: apt-get could not install everything (still missing: {', '.join(still) or '?'}); "
            f"try: {install_command(packages)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
