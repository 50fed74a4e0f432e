"""Where LoRA Studio keeps its own files."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The user's data directory (the converted demo model lives here).

    ``LORA_STUDIO_DATA_DIR`` overrides it, for tests and portable installs.
    """
    override = os.environ.get("LORA_STUDIO_DATA_DIR")
    if override:
        path = Path(override)
    else:
        from platformdirs import user_data_dir

        path = Path(user_data_dir("lora-studio", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path
