"""A conversation with several variants at once: every variant answers the same user turns with its own history.

Each variant's prompt for a turn is the chat template applied to ITS history (the user turns, and its own
earlier replies) plus the new user message, so the columns drift apart as a real conversation with each
model would. The turn's rows differ per variant; they still go through one mixed-adapter batch
(:func:`~lora_studio.core.compare.runs.generate_variants`, left-padded), the same as Compare's prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_studio.core.compare.runs import TokenDelta, generate_variants, inexact_reason
from lora_studio.core.compare.variants import Variant
from lora_studio.core.errors import UserError
from lora_studio.core.generation import generate as generation
from lora_studio.core.generation.chat_template import chat_ids
from lora_studio.core.generation.generate import GenerationSettings
from lora_studio.core.tasks import CancelToken, Report, no_report

if TYPE_CHECKING:
    from lora_studio.core.session import Session

Message = dict[str, str]


@dataclass(frozen=True)
class ChatReply:
    variant: str
    text: str
    token_ids: tuple[int, ...] = ()
    stopped: bool = False  # Stop came before the reply was complete


@dataclass(frozen=True)
class ChatTurn:
    user: str
    replies: dict[str, ChatReply]
    mixed_batch: bool = False
    fallback_reason: str | None = None
    seconds: float = 0.0
    inexact_reason: str | None = None  # as ComparisonResult's: half-precision batches can round differently


@dataclass
class Conversation:
    """The turns so far; each variant's history is the user turns and its own replies."""

    system: str | None = None
    turns: list[ChatTurn] = field(default_factory=list)

    def messages_for(self, variant: str) -> list[Message]:
        out: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            out.append({"role": "user", "content": turn.user})
            reply = turn.replies.get(variant)
            if reply is not None:
                out.append({"role": "assistant", "content": reply.text})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "conversation",
            "system": self.system,
            "turns": [
                {
                    "user": t.user,
                    "replies": {n: {"text": r.text, "stopped": r.stopped} for n, r in t.replies.items()},
                    "mixed_batch": t.mixed_batch,
                    "seconds": round(t.seconds, 3),
                }
                for t in self.turns
            ],
        }


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The chat template over ``messages``, ending with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template", "chat needs an instruct or chat model")
    for message in messages:
        generation.check_text(message["content"])
    return chat_ids(tokenizer, messages, add_generation_prompt=True)


def chat_turn(
    session: Session,
    variants: Sequence[Variant],
    conversation: Conversation,
    user: str,
    settings: GenerationSettings = GenerationSettings(),
    *,
    mixed: bool = True,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    on_tokens: Callable[[TokenDelta], None] | None = None,
) -> ChatTurn:
    """Every variant's reply to ``user`` after its own history in ``conversation`` (which is left as it was: the
    caller appends the turn)."""
    cancel = cancel or CancelToken()
    session.require_loaded()
    variants = list(variants)
    if not variants:
        raise UserError("no variants to chat with", "tick at least one variant")
    if not user.strip():
        raise UserError("the message is empty", "type a message")
    generation.validate(settings, user)
    started = time.perf_counter()
    with session.lock:
        rows = {
            (0, v.name): chat_prompt_ids(
                session.tokenizer, [*conversation.messages_for(v.name), {"role": "user", "content": user}]
            )
            for v in variants
        }
        outputs, used_mixed, reason = generate_variants(
            session, variants, rows, settings, mixed=mixed, cancel=cancel, report=report, on_tokens=on_tokens
        )
        replies = {
            v.name: ChatReply(
                v.name,
                session.tokenizer.decode(outputs[(0, v.name)], skip_special_tokens=True).strip(),
                tuple(outputs[(0, v.name)]),
            )
            for v in variants
        }
    return ChatTurn(
        user,
        replies,
        used_mixed,
        None if used_mixed else reason,
        time.perf_counter() - started,
        inexact_reason(session) if used_mixed else None,
    )
