"""What a Compare run streams and hands back, on both sides of the thread boundary (no widgets here).

The job runs on a worker: core ``compare`` streams TokenDelta objects into a :class:`DeltaBuffer`, which
the panel's ~30 Hz timer drains on the GUI thread, so a fast model never floods the event loop with one
signal per token. At the end the job also decodes what the display needs from the tokenizer (one
printable piece per reference token, for the KL strip's tooltips, and the character offset where each
column first differs), so the GUI thread never calls into the model or its tokenizer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_studio.core.generation.generate import GenerationSettings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lora_studio.core.compare import TokenDelta, Variant
    from lora_studio.core.session import Session


class DeltaBuffer:
    """TokenDeltas from the worker thread, drained by the GUI thread's timer. One per run, so a stale run is ignored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, str, int]] = []

    def push(self, delta: TokenDelta) -> None:  # worker thread
        with self._lock:
            self._items.append((delta.variant, delta.text, len(delta.token_ids)))

    def drain(self) -> dict[str, tuple[str, int]]:
        """{variant: (text added, tokens added)} since the last drain, in arrival order per variant."""
        with self._lock:
            items, self._items = self._items, []
        out: dict[str, tuple[str, int]] = {}
        for variant, text, count in items:
            old_text, old_count = out.get(variant, ("", 0))
            out[variant] = (old_text + text, old_count + count)
        return out


@dataclass
class RunOutcome:
    """What the compare job hands back: the core result plus what the display needs from the tokenizer."""

    result: Any  # core.compare.runs.ComparisonResult (one prompt)
    reference_pieces: list[str]  # the reference continuation, one printable piece per token (tooltips)
    divergence_offsets: dict[str, int | None] = field(default_factory=dict)  # char offset of the first differing token


def run_comparison(
    session: Session,
    variants: Sequence[Variant],
    prompt: str,
    settings: GenerationSettings,
    reference: str | None,
    buffer: DeltaBuffer,
    *,
    cancel,
    report,
) -> RunOutcome:
    """The job (worker thread): core compare, then token pieces and character offsets for the marks."""
    from lora_studio.core.compare import compare

    result = compare(
        session, variants, [prompt], settings, reference=reference, cancel=cancel, report=report, on_tokens=buffer.push
    )
    cmp = result.prompts[0]
    with session.lock:
        tokenizer = session.tokenizer
        ref_ids = cmp.output(cmp.divergence.reference).token_ids
        pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ref_ids]
        offsets: dict[str, int | None] = {}
        for out in cmp.outputs:
            first = cmp.divergence.column(out.name).first_divergence
            if first is None:
                offsets[out.name] = None
            else:
                prefix = tokenizer.decode(out.token_ids[:first], skip_special_tokens=True).rstrip("\ufffd")
                offsets[out.name] = min(len(display_text(prefix)), len(display_text(out.text)))
    return RunOutcome(result, pieces, offsets)


def display_text(text: str) -> str:
    """The text as a QPlainTextEdit holds it: a lone \\r (or \\r\\n) becomes one line break, so offsets stay aligned."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2029", "\n")
