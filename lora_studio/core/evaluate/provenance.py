"""Where a report's variants came from: the base and every variant with its path and the SHA-256 of its files, for the
evaluation's result and for Compare's shareable report (a layer above compare and report, which it joins)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.core.evaluate.columns import Column, GgufVariant
from lora_studio.core.io.hashing import file_sha256
from lora_studio.core.model.identity import base_fingerprint

if TYPE_CHECKING:
    from lora_studio.core.compare.runs import ComparisonResult
    from lora_studio.core.compare.variants import Variant
    from lora_studio.core.session import Session


def variant_provenance(session: Session, column: Column) -> dict[str, Any]:
    """One variant: its kind, its path and the SHA-256 of its weights (a combination has no file of its own)."""
    if isinstance(column, GgufVariant):
        return {
            "name": column.name,
            "kind": "gguf",
            "path": str(column.path) + (f" + {column.lora}" if column.lora else ""),
            "sha256": file_sha256(column.path),
            "scale": None,
        }
    if column.kind == "merged":
        assert column.beside is not None
        shards = sorted(column.beside.path.glob("*.safetensors"))
        return {
            "name": column.name,
            "kind": "merged",
            "path": str(column.beside.path),
            "sha256": file_sha256(shards[0]) if len(shards) == 1 else None,
            "scale": None,
        }
    if column.kind == "base":
        return {"name": column.name, "kind": "base", "path": None, "sha256": None, "scale": None}
    attached = session.adapters[column.adapter or ""]
    folder = Path(attached.path)
    combination = str(attached.path).startswith("combination (")
    weights = folder / "adapter_model.safetensors"
    return {
        "name": column.name,
        "kind": "combination" if combination else "adapter",
        "path": str(attached.path),
        "sha256": None if combination else file_sha256(weights),
        "scale": session.scales.get(attached.name, 1.0),
    }


def base_provenance(session: Session) -> dict[str, Any]:
    """The session's base: where it was loaded from, the hash of the file that names it, its dtype and device."""
    source = session.source
    if source is None:
        return {}
    return {
        "label": source.label,
        "path": str(source.file),
        **base_fingerprint(source),
        "dtype": session.dtype,
        "device": session.device,
    }


def comparison_report(session: Session, result: ComparisonResult, variants: Sequence[Variant]) -> dict[str, Any]:
    """A comparison as a shareable document (core/report/share.py renders it): the base and every variant with
    their paths and hashes, and each generated token's text for the divergence strips."""
    from lora_studio.core.report.share import comparison_document

    with session.lock:
        provenance = {
            "base": base_provenance(session),
            "variants": [variant_provenance(session, v) for v in variants],
        }
        tokenizer = session.tokenizer
        return comparison_document(result.to_json(), provenance=provenance, token_text=lambda t: tokenizer.decode([t]))
