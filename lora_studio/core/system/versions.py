"""What LoRA Studio runs on: its own version and those of the libraries it depends on (for About and bug reports).

Read from the installed packages' metadata, so nothing here imports torch or transformers.
"""

from __future__ import annotations

import platform
from importlib import metadata

# (shown name, distribution names to try) in the order About lists them
PACKAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LoRA Studio", ("lora-studio",)),
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
    ("peft", ("peft",)),
    ("safetensors", ("safetensors",)),
    ("PySide6", ("PySide6", "PySide6-Essentials")),  # the lock installs Essentials only
    ("pyqtgraph", ("pyqtgraph",)),
)


def package_version(*distributions: str) -> str:
    """The installed version of the first of these distributions that is installed, or "not installed"."""
    for distribution in distributions:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def versions() -> list[tuple[str, str]]:
    """[(name, version)] of LoRA Studio, Python and the main libraries."""
    found = [(name, package_version(*dists)) for name, dists in PACKAGES]
    if found[0][1] == "not installed":  # run from a source tree without an install
        from lora_studio import __version__

        found[0] = (found[0][0], f"{__version__} (not installed)")
    found.insert(1, ("Python", f"{platform.python_version()} ({platform.python_implementation()})"))
    return found
