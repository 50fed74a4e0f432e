"""SHA-256 of files (and of a folder's files), for model cards and training cards."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str | None:
    """The file's hash, or None when it cannot be read."""
    return tree_sha256(path, chunk) if Path(path).is_file() else None


def tree_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str | None:
    """One hash over a file, or over a folder's files in name order; None when something cannot be read."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    try:
        for file in files:
            with open(file, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
    except OSError:
        return None
    return h.hexdigest()
