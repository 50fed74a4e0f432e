"""The Compare tab's chat mode: the conversation, one job per turn, the replies streamed into the chat view.

Every ticked variant answers the same user turn after its own history (core ``chat_turn``, one job). The
tab's flush timer draws the streamed tokens through :meth:`ChatMode.flush`. A stopped turn keeps what each
variant had said so far, marked stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from lora_studio.core.compare.chat import ChatReply, ChatTurn, Conversation
from lora_studio.core.errors import UserError
from lora_studio.core.generation.generate import validate
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.tabs.compare.chat import ChatView
from lora_studio.gui.tabs.compare.host import CompareTab
from lora_studio.gui.tabs.compare.stream import DeltaBuffer

if TYPE_CHECKING:
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report

T = TypeVar("T")


class ChatMode:
    """The conversation shown in ``view``: send a turn, draw its replies, keep them (or what a stop left)."""

    def __init__(self, host: CompareTab, view: ChatView) -> None:
        self.host, self.view = host, view
        self.conversation = Conversation()
        self.buffer: DeltaBuffer | None = None  # the turn in progress streams here

    def follows_ticks(self) -> bool:
        """The chat's columns are the ticked variants."""
        return [name for name, _ in self.host.variants.ticked()] == self.view.names()

    def ticks_changed(self) -> None:
        if self.conversation.turns:
            self.host.show_message("the variants changed: a new chat begins", "info")
        self.new_chat()

    def new_chat(self) -> None:
        """Forget the conversation; the system prompt in the box applies to the new one."""
        system = self.view.system_edit.text().strip() or None
        self.conversation = Conversation(system=system)
        self.view.build(self.host.variants.ticked())
        self.view.note.setText("")

    def turns_of(self, name: str) -> list[tuple[str, str, bool]]:
        """(user, reply, stopped) of every turn ``name`` answered."""
        turns = [t for t in self.conversation.turns if name in t.replies]
        return [(t.user, t.replies[name].text, t.replies[name].stopped) for t in turns]

    def send(self, text: str) -> Job | None:
        """One turn: every ticked variant answers ``text`` after its own history; the job, or None after why."""
        from lora_studio.core.compare.chat import chat_turn

        host = self.host
        settings = host.decoding.settings(use_chat_template=True)
        try:
            if not host.state.base:
                raise UserError("load a base model first", "pick one on the left")
            if not host.variants.ticked():
                raise UserError("no variants are ticked", "tick at least one variant")
            if not text.strip():
                raise UserError("the message is empty", "type a message")
            validate(settings, text)
        except UserError as exc:
            host.show_message(str(exc), "error")
            return None
        if not self.follows_ticks():  # the ticks changed while a job ran
            self.new_chat()
        variants = host.variants.core_variants(host.variants.ticked())
        conversation, buffer = self.conversation, DeltaBuffer()
        mixed = not host.decoding.one_at_a_time.isChecked()

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> ChatTurn:
            return chat_turn(
                session,
                variants,
                conversation,
                text,
                settings,
                mixed=mixed,
                cancel=cancel,
                report=report,
                on_tokens=buffer.push,
            )

        what = f"chatting with {len(variants)} variants"
        job = host.op(what, fn).on_end(self._ended).on_success(self._done).on_cancel(lambda: self._stopped(text)).run()
        if job is None:
            return None
        host.job, self.buffer = job, buffer
        for column in self.view.columns:
            column.begin_reply(self.turns_of(column.name), text)
        self.view.input.clear()
        host.start_streaming()
        host.show_message(f"{what}…")
        host.update_buttons()
        return job

    def flush(self) -> None:
        """Draw what the turn in progress streamed since the last tick."""
        if self.buffer is None:
            return
        for (_turn, variant), (text, _count) in self.buffer.drain_prompts().items():
            if variant in self.view.names():
                self.view.column(variant).append(text)

    def _ended(self) -> None:
        self.host.stop_streaming()  # the last tokens drawn
        self.buffer = None
        self.host.job = None

    def _done(self, turn: ChatTurn) -> None:
        self.conversation.turns.append(turn)
        self._show_turns()
        how = "one mixed batch" if turn.mixed_batch else f"sequential: {turn.fallback_reason}"
        if turn.inexact_reason:
            how += f" (note: {turn.inexact_reason} — tick one at a time)"
        self.view.note.setText(f"turn {len(self.conversation.turns)} · {how} · {turn.seconds:.1f} s")
        self.host.show_message(f"{len(turn.replies)} variants answered", "ok")
        self.host.update_buttons()

    def _stopped(self, text: str) -> None:
        """Stop: what each variant said so far stays in its history, marked stopped."""
        replies = {c.name: ChatReply(c.name, c.streamed.strip(), stopped=True) for c in self.view.columns}
        self.conversation.turns.append(ChatTurn(text, replies))
        self._show_turns()
        self.host.show_message("stopped; the partial replies stay in the conversation", "warn")
        self.host.update_buttons()

    def _show_turns(self) -> None:
        for column in self.view.columns:
            column.show_turns(self.turns_of(column.name))
