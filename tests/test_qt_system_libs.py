"""Finding the system libraries Qt's window lacks, and the Debian packages that bring them."""

from __future__ import annotations

from lora_studio import qt_system_libs

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f)
\tlibxcb-cursor.so.0 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibmystery.so.7 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)
"""


def test_ldd_output_names_the_missing_libraries():
    assert qt_system_libs.parse_ldd(LDD) == [
        "libxcb-cursor.so.0",
        "libxcb-icccm.so.4",
        "libxcb-keysyms.so.1",
        "libmystery.so.7",
    ]


def test_missing_libraries_map_to_debian_packages():
    packages, unknown = qt_system_libs.packages_for(qt_system_libs.parse_ldd(LDD))
    assert packages == ["libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1"]
    assert unknown == ["libmystery.so.7"]
    assert "apt-get install -y libxcb-cursor0" in qt_system_libs.install_command(packages)


def test_the_real_qt_plugin_is_found_and_checked():
    qt = qt_system_libs.qt_folder()
    assert qt is not None
    assert any(p.name == "libqxcb.so" for p in qt_system_libs.binaries(qt))
    assert isinstance(qt_system_libs.missing_libraries(qt), list)  # empty where the window can open
