"""What an evaluation scores: the session's variants (core.compare) and GGUF files run by llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_studio.core.compare.variants import Variant


@dataclass(frozen=True)
class GgufVariant:
    """A GGUF file (optionally with an adapter GGUF on top) scored by llama.cpp."""

    name: str
    path: Path
    lora: Path | None = None


Column = Variant | GgufVariant
