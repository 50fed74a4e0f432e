"""The Adapters tab's Try it box: the active adapter (or the base) on one prompt, streamed like a Compare column.

The box belongs to a panel (the Adapters tab): its generation is one model job run through that panel's
:meth:`~lora_studio.gui.base.panel.Panel.op`, so it shows in the panel's progress bar and message line. The worker
pushes text into a :class:`TextBuffer`; a ~30 Hz timer on the GUI thread drains it into the output box.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from PySide6.QtCore import QTimer
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QGroupBox, QHBoxLayout, QLineEdit, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

from lora_studio.gui.base.decoding import DecodingBox
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.shortcuts import add_run_shortcuts

if TYPE_CHECKING:
    from lora_studio.core.generation.generate import Generated
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.panel import Panel

FLUSH_INTERVAL_MS = 33  # ~30 redraws a second while Try it streams (Compare's rate)
OUTPUT_PLACEHOLDER = "the output streams here as it is generated"


class TextBuffer:
    """Text the worker streams, drained by the GUI thread's timer: never one signal per token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._tokens = 0

    def push(self, text: str, tokens: int) -> None:  # worker thread
        with self._lock:
            self._parts.append(text)
            self._tokens += tokens

    def drain(self) -> tuple[str, int]:
        """(text added, tokens added) since the last drain."""
        with self._lock:
            parts, tokens, self._parts, self._tokens = self._parts, self._tokens, [], 0
        return "".join(parts), tokens


class TryItBox(QGroupBox):
    """Prompt, Generate / Stop, the streamed output and the decoding settings (Compare's widget)."""

    def __init__(self, panel: Panel, parent: QWidget | None = None) -> None:
        super().__init__("Try it (active adapter)", parent)
        self.panel = panel
        self.generate_job: Job | None = None
        self.streamed_tokens = 0
        self._stream = TextBuffer()
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(FLUSH_INTERVAL_MS)
        self._flush_timer.timeout.connect(self.flush)

        self.prompt_edit = QLineEdit()
        self.prompt_edit.setPlaceholderText("a prompt for the active adapter (or the base)… Enter or Ctrl+Enter runs")
        self.prompt_edit.returnPressed.connect(self.generate)
        self.generate_btn = QPushButton("Generate")
        self.generate_btn.clicked.connect(self.generate)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.clicked.connect(self.stop)
        self.run_shortcuts = add_run_shortcuts(self, self.generate)  # Ctrl+Enter anywhere in the box, as in Compare
        self.decoding = DecodingBox()  # Compare's decoding settings, the same widget
        self.decoding.setTitle("Decoding")
        self.max_tokens = self.decoding.max_tokens
        self.max_tokens.setValue(48)
        row = QHBoxLayout()
        row.addWidget(self.prompt_edit, 1)
        row.addWidget(self.generate_btn)
        row.addWidget(self.stop_btn)
        self.output = QPlainTextEdit(readOnly=True)
        self.output.setPlaceholderText(OUTPUT_PLACEHOLDER)
        self.output.setMinimumHeight(60)
        below = QHBoxLayout()
        below.addWidget(self.output, 1)
        below.addWidget(self.decoding)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        layout.addLayout(row)
        layout.addLayout(below, 1)

    def update_buttons(self, reason: str) -> None:
        """``reason``: why Generate may not start now ('' when it may)."""
        self.panel.set_reasons(
            {self.generate_btn: (reason, "Generate with the active adapter, streamed (Enter or Ctrl+Enter)")}
        )
        running = self.generate_job is not None
        self.stop_btn.setEnabled(running)
        self.stop_btn.setToolTip("stop generating within one decoding step" if running else "nothing is generating")

    def prefill_demo(self, adapter: str | None) -> None:
        """--demo: the active demo adapter's own prompt, as Compare has it (an empty box asks the user to guess)."""
        from lora_studio.core.demo import assets as demo_assets
        from lora_studio.core.errors import UserError

        try:
            prompts = demo_assets.demo_prompts()
        except UserError:
            return
        prompt = prompts.get(adapter or "") or next(iter(prompts.values()), "")
        if prompt and not self.prompt_edit.text():
            self.prompt_edit.setText(prompt)

    def generate(self) -> Job | None:
        """Generate with the active adapter (or the base), streamed into the output box as tokens arrive."""
        from lora_studio.core.generation.generate import generate

        if self.generate_job is not None:
            return None  # Ctrl+Enter again while it streams: the running one goes on (Stop ends it)
        panel = self.panel
        prompt = self.prompt_edit.text()
        settings = self.decoding.settings(use_chat_template=True)
        who = panel.state.active_adapter or "base"
        stream = TextBuffer()

        def run(session: Session, *, cancel: CancelToken, report: Report) -> Generated:
            with session.lock:
                model = session.require_loaded()
                return generate(
                    model, session.tokenizer, prompt, settings, cancel=cancel, report=report, on_text=stream.push
                )

        def done(generated: Generated) -> None:
            self.output.setPlainText(generated.text)  # exactly the decoded result, whatever was streamed
            count = len(generated.token_ids)
            cut = " — cut at the max new tokens (raise it for the rest)" if count >= settings.max_new_tokens else ""
            panel.show_message(f"{who}: {count} tokens{cut}", "ok")

        job = (
            panel.op(f"generating with {who}", run)
            .on_end(self._end_generation)
            .on_success(done)
            .on_cancel(lambda: panel.show_message(f"{who}: stopped after {self.streamed_tokens} tokens", "warn"))
            .run()
        )
        if job is None:
            return None
        self._stream, self.generate_job, self.streamed_tokens = stream, job, 0
        self.output.setPlainText("")
        self.output.setPlaceholderText("waiting for the first token…")
        self._flush_timer.start()
        panel.update_buttons()
        return job

    def stop(self) -> None:
        if self.panel.cancel_job(self.generate_job, "stopping…", "warn"):
            self.stop_btn.setEnabled(False)

    def flush(self) -> None:
        """Append what the worker streamed since the last tick (the timer's slot)."""
        text, tokens = self._stream.drain()
        if not text and not tokens:
            return
        self.streamed_tokens += tokens
        if text:
            cursor = self.output.textCursor()
            cursor.movePosition(QTextCursor.MoveOperation.End)
            cursor.insertText(text)
            self.output.setTextCursor(cursor)
            self.output.ensureCursorVisible()

    def _end_generation(self) -> None:
        self._flush_timer.stop()
        self.flush()
        self.generate_job = None
        self.output.setPlaceholderText(OUTPUT_PLACEHOLDER)
