"""The two questions the Adapters tab asks: resize the vocabulary for an adapter's added tokens, unload all.

The panel keeps them as replaceable callables (``confirm_resize``, ``confirm_unload``) so that tests and the
soak answer without a dialog.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtWidgets import QWidget

from lora_studio.core.adapters.compatibility import VocabularyMismatch
from lora_studio.gui.base.widgets import ask_yes_no, names_shown


def ask_resize(parent: QWidget, mismatch: VocabularyMismatch) -> bool:
    """Yes: attach again with the base's embeddings resized to the adapter's tokenizer."""
    return ask_yes_no(
        parent,
        "Resize the vocabulary?",
        f"{mismatch.message}.\n\nThe adapter folder has its own tokenizer with the added tokens. "
        f"Resize the base's embeddings to {mismatch.adapter_vocab} tokens and use that tokenizer? "
        "(The files on disk are not changed; a merge saves the adapter's tokenizer with the model.)",
        default_yes=True,
    )


def ask_unload(parent: QWidget, names: Sequence[str]) -> bool:
    """Yes: detach every adapter in ``names`` (the base stays)."""
    return ask_yes_no(
        parent,
        "Unload all adapters?",
        f"Detach all {len(names)} adapters ({names_shown(names)}) from the model and free their memory?\n\n"
        "The base stays loaded and the adapter folders on disk are untouched; attach them again to use them.",
    )
