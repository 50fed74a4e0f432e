"""What a Compare run streams and hands back, on both sides of the thread boundary (no widgets here).

The job runs on a worker: core ``compare`` streams TokenDelta objects into a :class:`DeltaBuffer`, which
the panel's ~30 Hz timer drains on the GUI thread, so a fast model never floods the event loop with one
signal per token. At the end the job also decodes what the display needs from the tokenizer (one
printable piece per reference token, for the KL strip's tooltips, where each reference token sits in
the text, for the strip's hover, and the character offset where each column first differs), so the GUI
thread never calls into the model or its tokenizer. A run may hold several prompts ("Run all prompts"):
deltas carry their prompt's index and the display data comes per prompt.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_studio.core.generation.generate import GenerationSettings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lora_studio.core.compare import TokenDelta, Variant
    from lora_studio.core.compare.runs import PromptComparison
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report


class DeltaBuffer:
    """TokenDeltas from the worker thread, drained by the GUI thread's timer. One per run, so a stale run is ignored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[int, str, str, int]] = []

    def push(self, delta: TokenDelta) -> None:  # worker thread
        with self._lock:
            self._items.append((delta.prompt_index, delta.variant, delta.text, len(delta.token_ids)))

    def drain(self) -> dict[str, tuple[str, int]]:
        """{variant: (text added, tokens added)} since the last drain, in arrival order per variant (one prompt)."""
        out: dict[str, tuple[str, int]] = {}
        for (_prompt, variant), (text, count) in self.drain_prompts().items():
            old_text, old_count = out.get(variant, ("", 0))
            out[variant] = (old_text + text, old_count + count)
        return out

    def drain_prompts(self) -> dict[tuple[int, str], tuple[str, int]]:
        """{(prompt index, variant): (text added, tokens added)} since the last drain, in arrival order."""
        with self._lock:
            items, self._items = self._items, []
        out: dict[tuple[int, str], tuple[str, int]] = {}
        for prompt, variant, text, count in items:
            old_text, old_count = out.get((prompt, variant), ("", 0))
            out[(prompt, variant)] = (old_text + text, old_count + count)
        return out


@dataclass
class PromptDisplay:
    """What the columns of one prompt need from the tokenizer (decoded on the worker)."""

    reference_pieces: list[str]  # the reference continuation, one printable piece per token (tooltips)
    divergence_offsets: dict[str, int | None] = field(default_factory=dict)  # char offset of the first differing token
    token_spans: list[tuple[int, int]] = field(default_factory=list)  # each reference token's chars in the shown text


@dataclass
class RunOutcome:
    """What the compare job hands back: the core result plus, per prompt, what the display needs from the tokenizer."""

    result: Any  # core.compare.runs.ComparisonResult (one PromptComparison per prompt run)
    displays: list[PromptDisplay]

    @property
    def reference_pieces(self) -> list[str]:
        """The first prompt's reference pieces (a one-prompt run has only that one)."""
        return self.displays[0].reference_pieces

    @property
    def divergence_offsets(self) -> dict[str, int | None]:
        return self.displays[0].divergence_offsets


def run_comparison(
    session: Session,
    variants: Sequence[Variant],
    prompts: str | Sequence[str],
    settings: GenerationSettings,
    reference: str | None,
    buffer: DeltaBuffer,
    *,
    mixed: bool = True,
    cancel: CancelToken,
    report: Report,
) -> RunOutcome:
    """The job (worker thread): core compare, then token pieces and character offsets for the marks, per prompt."""
    from lora_studio.core.compare import compare

    result = compare(
        session,
        variants,
        prompts,
        settings,
        reference=reference,
        mixed=mixed,
        cancel=cancel,
        report=report,
        on_tokens=buffer.push,
    )
    with session.lock:
        displays = [_prompt_display(session.tokenizer, cmp) for cmp in result.prompts]
    return RunOutcome(result, displays)


def _prompt_display(tokenizer: Any, cmp: PromptComparison) -> PromptDisplay:
    """``cmp``: a core PromptComparison. Offsets are in display_text() characters, clamped to the column's text."""

    def shown_length(token_ids: list[int], whole: str) -> int:
        prefix = tokenizer.decode(token_ids, skip_special_tokens=True).rstrip("\ufffd")
        return min(len(display_text(prefix)), len(display_text(whole)))

    measured = cmp.divergence
    if measured is None:  # core compare() always measures one; without it there are no marks to place
        return PromptDisplay([], {}, [])
    reference = cmp.output(measured.reference)
    ref_ids = list(reference.token_ids)
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ref_ids]
    offsets: dict[str, int | None] = {}
    for out in cmp.outputs:
        first = measured.column(out.name).first_divergence
        offsets[out.name] = None if first is None else shown_length(out.token_ids[:first], out.text)
    # Where each reference token starts in the shown text: the decoded prefix's length (special tokens show as "").
    starts = [shown_length(ref_ids[:i], reference.text) for i in range(len(ref_ids) + 1)]
    spans = [(starts[i], max(starts[i], starts[i + 1])) for i in range(len(ref_ids))]
    return PromptDisplay(pieces, offsets, spans)


def display_text(text: str) -> str:
    """The text as a QPlainTextEdit holds it: a lone \\r (or \\r\\n) becomes one line break, so offsets stay aligned."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2029", "\n")
