"""Where LoRA Studio keeps its own files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def is_utf8_path(path: Path) -> bool:
    try:
        os.fsencode(str(path)).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@contextmanager
def utf8_path(path: Path) -> Iterator[Path]:
    """A UTF-8 path to the same file or folder.

    safetensors' Rust core (and so transformers and PEFT) rejects paths that are not
    valid UTF-8, which Linux allows. Such a path is reached through a symlink in a
    temporary folder instead: nothing is copied, however big the model.
    """
    path = Path(path)
    if is_utf8_path(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lora-studio-link-") as tmp:
        link = Path(tmp) / (path.name.encode("utf-8", "replace").decode("utf-8", "replace") or "model")
        link = Path(tmp) / "".join(c if c.isprintable() and c != "\ufffd" else "_" for c in link.name)
        os.symlink(os.path.abspath(path), link)
        yield link
