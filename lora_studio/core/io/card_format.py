"""The YAML front matter of a Hub-style README card (merged models, trained adapters)."""

from __future__ import annotations

import json
from collections.abc import Sequence


def yaml_scalar(value: str) -> str:
    """A YAML string that stays one string (quoted when plain style could read it as something else)."""
    plain = value and value.strip() == value and not any(c in value for c in ":#{}[],&*!|>'\"%@`") and value[0] != "-"
    return value if plain else json.dumps(value)


def front_matter(*, base_model: str | None, library_name: str, license: str | None, tags: Sequence[str]) -> list[str]:
    """The card's metadata lines, between the two ``---``: base (a hub id), library, license, tags."""
    lines = []
    if base_model:
        lines.append(f"base_model: {yaml_scalar(base_model)}")
    lines.append(f"library_name: {library_name}")
    if license:
        lines.append(f"license: {yaml_scalar(license)}")
    lines.append("tags:")
    lines += [f"- {yaml_scalar(t)}" for t in tags]
    return ["---", *lines, "---"]
