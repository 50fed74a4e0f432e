"""Who a base model is, for cards: its Hugging Face Hub id and its license, when its files say."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path

from lora_studio.core.errors import UserError
from lora_studio.core.io.hashing import file_sha256
from lora_studio.core.model.config import read_config
from lora_studio.core.model.sources import ModelSource

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_fingerprint(source: ModelSource) -> dict[str, str | None]:
    """What identifies a base's files on a card: the SHA-256 of its config.json, or of the GGUF file it was opened
    from, with the name of the file hashed (``hashed``), so a card never calls a GGUF's hash a config's."""
    hashed = source.file if source.gguf_file else source.path / "config.json"
    return {"hashed": hashed.name, "config_sha256": file_sha256(hashed) if hashed.is_file() else None}


def hub_id(source: ModelSource, named_by_adapters: Iterable[str] = ()) -> str | None:
    """The base's Hub id when known: the cache's repo id, else the one its adapters name (when they agree),
    else the config's ``_name_or_path``, when it reads as ``owner/name`` and is no local path."""
    if source.repo_id:
        return source.repo_id
    named = set(named_by_adapters)
    candidates = [named.pop()] if len(named) == 1 else []
    with contextlib.suppress(UserError):  # a damaged config is the caller's error to report, not this one's
        candidates.append(str(read_config(source, missing_ok=True).get("_name_or_path") or ""))
    for name in candidates:
        if name and _HUB_ID.match(name) and not Path(name).expanduser().exists():
            return name
    return None


def base_license(source: ModelSource) -> str | None:
    """The base's license when it says: its README.md front matter (``license:``), else its config.json."""
    if source.gguf_file:
        return None
    readme = source.path / "README.md"
    try:
        text = readme.read_text("utf-8", errors="replace") if readme.is_file() else ""
    except OSError:
        text = ""
    if text.startswith("---"):
        for line in text.split("\n")[1:]:
            if line.strip() == "---":
                break
            key, sep, value = line.partition(":")
            if sep and key.strip() == "license" and value.strip().strip("'\""):
                return value.strip().strip("'\"")
    try:
        license_value = read_config(source, missing_ok=True).get("license")
    except UserError:
        return None
    return license_value if isinstance(license_value, str) and license_value.strip() else None
