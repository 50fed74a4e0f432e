"""What a comparison compares: its columns (*variants*) and merged folders loaded beside the session.

A variant is the base (adapters disabled), an attached adapter, a weighted
combination registered on the session (:meth:`Session.register_combination`, an
adapter like any other), or a merged model folder loaded read-only beside the
session (:func:`load_beside`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lora_studio.core.errors import UserError
from lora_studio.core.tasks import CancelToken, Report, no_report

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lora_studio.core.session import Session


@dataclass(frozen=True)
class BesideModel:
    """A merged model folder loaded read-only next to the session (its own model object)."""

    path: Path
    model: PreTrainedModel = field(repr=False, compare=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False, compare=False)


# "adapter": attached or a combination on the session; "merged": a merged folder loaded beside it
VariantKind = Literal["base", "adapter", "merged"]


@dataclass(frozen=True)
class Variant:
    """One column of a comparison."""

    name: str
    kind: VariantKind
    adapter: str | None = None  # the session's adapter name, for kind "adapter"
    beside: BesideModel | None = field(default=None, compare=False)  # for kind "merged"

    @staticmethod
    def base(name: str = "base") -> Variant:
        return Variant(name, "base")

    @staticmethod
    def of_adapter(adapter: str, name: str | None = None) -> Variant:
        return Variant(name or adapter, "adapter", adapter=adapter)

    @staticmethod
    def merged(beside: BesideModel, name: str | None = None) -> Variant:
        return Variant(name or beside.path.name, "merged", beside=beside)

    @property
    def on_session(self) -> bool:
        return self.kind in ("base", "adapter")


def session_variants(session: Session, *, include_base: bool = True) -> list[Variant]:
    """The base (optionally) and every adapter attached to the session, in attach order."""
    out = [Variant.base()] if include_base else []
    out += [Variant.of_adapter(name) for name in session.adapters]
    return out


def load_beside(
    path: str | Path, session: Session, *, cancel: CancelToken | None = None, report: Report = no_report
) -> BesideModel:
    """Load a merged model folder read-only, with the session's dtype and device, for comparison."""
    from lora_studio.core.model.loading import load_base
    from lora_studio.core.model.sources import resolve_source

    session.require_loaded()
    path = Path(path).expanduser()
    source = resolve_source(path)
    model, tokenizer = load_base(
        source,
        dtype=session.dtype or "float32",
        device_map=session.device_map or "cpu",
        cancel=cancel or CancelToken(),
        report=report,
    )
    model.eval()
    ours = session.base_model().get_input_embeddings().num_embeddings
    theirs = model.get_input_embeddings().num_embeddings
    if ours != theirs or len(tokenizer) != len(session.tokenizer):
        raise UserError(
            f"{path.name} has a vocabulary of {theirs} rows ({len(tokenizer)} tokens), "
            f"the session's base has {ours} ({len(session.tokenizer)})",
            "compare a model merged from this base",
        )
    return BesideModel(path, model, tokenizer)
