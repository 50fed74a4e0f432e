"""The Compare tab: the same prompt through several variants side by side, streamed, with divergence marks.

The variants (compare_variants.py) are the base, every adapter on the session and merged folders
loaded beside it; each ticked one becomes a column (compare_columns.py). One Run is one model job on
the window's runner (compare_stream.run_comparison): tokens arrive on the worker thread, are queued in
a DeltaBuffer and drawn by a ~30 Hz timer. After a run every column is marked where it first differs
from the reference column, with the per-token KL against it in a strip.

"Run all prompts" runs the loaded prompt list in one job (core compare takes several prompts); a
prompt bar above the columns picks which prompt's results the columns show, while it streams and after
(compare_results.py: the prompt bar, the legend and the columns). The Merge tab's "Compare merged vs
adapter" lands in :meth:`ComparePanel.add_merged_variant` with the adapters the folder came from
(compare_merged.py): exactly those columns are ticked, the adapter being the reference.

The GUI thread never calls into the model: merged models travel as opaque references from the job
that loaded them to the job that compares them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QApplication,
    QButtonGroup,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.compare.chat import ChatReply, ChatTurn, Conversation
from lora_studio.core.errors import UserError
from lora_studio.core.generation.generate import GenerationSettings, validate
from lora_studio.core.session import SessionState
from lora_studio.gui.compare_chat import ChatView
from lora_studio.gui.compare_columns import KIND_ADAPTER, KIND_BASE, ColumnView
from lora_studio.gui.compare_inputs import DecodingBox, PromptBox
from lora_studio.gui.compare_merged import MergedFolders
from lora_studio.gui.compare_results import CompareResults
from lora_studio.gui.compare_stream import DeltaBuffer, RunOutcome, run_comparison
from lora_studio.gui.compare_variants import VariantPicker
from lora_studio.gui.jobs import Job, JobRunner
from lora_studio.gui.panel import Panel
from lora_studio.gui.session_model import SessionModel
from lora_studio.gui.shortcuts import add_run_shortcuts

FLUSH_INTERVAL_MS = 33  # ~30 redraws a second while tokens stream
SIDE_WIDTH = 215  # the variant list and decoding box; the rest of the tab is the columns'


class ComparePanel(Panel):
    run_finished = Signal(object)  # RunOutcome

    def __init__(self, runner: JobRunner, session_model: SessionModel, parent: QWidget | None = None) -> None:
        super().__init__(runner, session_model, parent)
        self.job: Job | None = None
        self._columns_stale = False  # the ticks changed while the tab was hidden: columns built when it is shown
        self._buffer = DeltaBuffer()
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(FLUSH_INTERVAL_MS)
        self._flush_timer.timeout.connect(self.flush)
        self._template_for: str | None = None  # the base whose tokenizer the chat toggle follows

        self.variants = VariantPicker()
        self.variants.ticks_changed.connect(self._ticks_changed)
        self.variants.current_changed.connect(self.update_buttons)
        self.variants.scale_changed.connect(self.set_adapter_scale)
        self.merged_folders = MergedFolders(self)
        self.variants.add_merged_btn.clicked.connect(self.merged_folders.browse)
        self.variants.remove_btn.clicked.connect(self.merged_folders.remove_selected)
        self.reference_combo = self.variants.reference_combo
        self.decoding = DecodingBox(batching=True)
        self.max_tokens = self.decoding.max_tokens
        self.prompt_box = PromptBox()
        self.prompt_box.load_btn.clicked.connect(self.browse_prompts)
        self.prompt_edit, self.prompt_select = self.prompt_box.edit, self.prompt_box.select

        # Prompts: one prompt (or a list) through every variant; Chat: a conversation, each variant its own history
        self.prompts_mode_btn = QPushButton("Prompts")
        self.chat_mode_btn = QPushButton("Chat")
        self.chat_mode_btn.setToolTip("a multi-turn conversation: every variant answers the same turns side by side")
        modes = QButtonGroup(self)
        for button in (self.prompts_mode_btn, self.chat_mode_btn):
            button.setCheckable(True)
            modes.addButton(button)
        self.prompts_mode_btn.setChecked(True)
        self.chat_mode_btn.toggled.connect(self.set_chat_mode)
        mode_row = QHBoxLayout()
        mode_row.setSpacing(0)
        mode_row.addWidget(self.prompts_mode_btn)
        mode_row.addWidget(self.chat_mode_btn)

        side = QWidget()
        slay = QVBoxLayout(side)
        slay.setContentsMargins(0, 0, 0, 0)
        slay.addLayout(mode_row)
        slay.addWidget(self.variants, 1)
        slay.addWidget(self.decoding)

        # run bar
        self.run_btn = QPushButton("Run")
        self.run_btn.setDefault(True)
        self.run_btn.clicked.connect(self.run)
        self.run_all_btn = QPushButton("Run all prompts")
        self.run_all_btn.clicked.connect(self.run_all)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.clicked.connect(self.stop)
        self.share_btn = QToolButton()
        self.share_btn.setText("Share")
        self.share_btn.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        share_menu = QMenu(self.share_btn)
        self.copy_markdown_action = share_menu.addAction("Copy as Markdown", self.copy_markdown)
        self.save_report_action = share_menu.addAction("Save report…", self.save_report)
        self.share_btn.setMenu(share_menu)
        self._shown: tuple[Any, list[Any]] | None = None  # the last finished run: (ComparisonResult, its variants)
        self._pending_variants: list[Any] = []
        self.note = QLabel("")
        self.note.setStyleSheet("color: palette(mid);")
        self.note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # a long note (a sequential run's reason) is cut, not allowed to widen the tab; the tooltip has it all
        self.note.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_btn)
        run_row.addWidget(self.run_all_btn)
        run_row.addWidget(self.stop_btn)
        run_row.addWidget(self.share_btn)
        self.progress.setMinimumWidth(200)  # "generating: 270/768 tokens" in full
        run_row.addWidget(self.progress, 1)
        run_row.addWidget(self.note, 2)
        # Ctrl+Enter runs from anywhere in the tab (the prompt box included); Tab leaves the prompt box
        self.run_shortcuts = add_run_shortcuts(self, self._run_key)

        self.results = CompareResults()
        self.results.summary_changed.connect(self._show_summary)

        prompts_page = QWidget()
        mlay = QVBoxLayout(prompts_page)
        mlay.setContentsMargins(0, 0, 0, 0)
        mlay.addWidget(self.prompt_box)
        mlay.addLayout(run_row)
        mlay.addWidget(self.results, 1)
        self.chat = ChatView()
        self.chat.send_requested.connect(self.send_chat)
        self.chat.stop_requested.connect(self.stop)
        self.chat.new_chat_requested.connect(self.new_chat)
        self.conversation = Conversation()
        self._chat_buffer: DeltaBuffer | None = None
        self.pages = QStackedWidget()
        self.prompts_page = prompts_page
        self.pages.addWidget(prompts_page)
        self.pages.addWidget(self.chat)
        main = QWidget()
        main_layout = QVBoxLayout(main)
        main_layout.setContentsMargins(0, 0, 0, 0)
        main_layout.addWidget(self.pages, 1)
        main_layout.addWidget(self.message)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(side)
        splitter.addWidget(main)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([SIDE_WIDTH, 1000])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(splitter)
        self.show_state(self.state)

    # -- state ------------------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        """Refresh the variant list from a session snapshot (never reads the session itself while a job may hold it)."""
        previous = self.state
        self.state = state
        if not state.base or previous.base_path != state.base_path:
            self.merged_folders.release(self.variants.take_merged())  # loaded beside another base: no longer comparable
        if state.base and state.base_path != self._template_for:
            self._template_for = state.base_path
            self.prompt_box.follow_tokenizer(self.session_model.has_chat_template())
        self.variants.show_state(state)

    @property
    def merged(self) -> dict[str, Any]:
        """Column name -> merged folder loaded beside the session (opaque references)."""
        return self.variants.merged

    @property
    def prompts(self) -> list[str]:
        return self.prompt_box.prompts

    def base_name(self) -> str:
        return self.variants.base_name()

    def available_variants(self) -> list[tuple[str, str]]:
        return self.variants.available_variants()

    def ticked(self) -> list[tuple[str, str]]:
        return self.variants.ticked()

    def set_ticked(self, names) -> None:
        """Tick exactly ``names`` (and untick the rest)."""
        self.variants.set_ticked(names)

    def _chat_follows_ticks(self) -> bool:
        return [name for name, _ in self.ticked()] == self.chat.names()

    def _chat_ticks_changed(self) -> None:
        if self.conversation.turns:
            self.show_message("the variants changed: a new chat begins", "info")
        self.new_chat()

    def _ticks_changed(self) -> None:
        if self.job is None:
            ticked = self.ticked()
            # a snapshot that leaves the ticked variants as they are (another adapter made active) keeps the
            # columns and the last run's outputs
            if [(c.name, c.kind) for c in self.results.columns] != ticked:
                # built when the tab is shown: an adapter attached from another tab (a training run's end) rebuilt
                # every column of a tab nobody was looking at, ~15 ms of the GUI thread in that turn
                self._columns_stale = True
                if self.isVisible():
                    self._show_ticked_columns()
            if not self._chat_follows_ticks():
                self._chat_ticks_changed()
        self.update_buttons()

    @property
    def columns(self) -> list[ColumnView]:
        """The columns shown, one per variant of the last run (or of the ticks since)."""
        self._show_ticked_columns()
        return self.results.columns

    def _show_ticked_columns(self) -> None:
        if self._columns_stale:
            self._columns_stale = False
            if self.job is None:
                self.results.show_ticked(self.ticked())

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._show_ticked_columns()

    def column(self, name: str) -> ColumnView:
        return self.results.column(name)

    @property
    def outcome(self) -> RunOutcome | None:
        """The last finished run (None while one runs, or before the first)."""
        return self.results.outcome

    def update_buttons(self) -> None:
        running = self.job is not None
        reason = self.busy_reason or ("" if self.state.base else "load a base model first")
        count = len(self.prompts)
        all_reason = reason or ("" if count else "load a prompt list first (Load prompts…)")
        self.set_reasons(
            {
                self.run_btn: (reason, "run the prompt through every ticked variant (Ctrl+Enter)"),
                self.run_all_btn: (all_reason, f"run all {count} loaded prompts; the bar above the columns picks one"),
            }
        )
        self.stop_btn.setEnabled(running)
        self.stop_btn.setToolTip("stop the comparison within one decoding step" if running else "nothing is running")
        send = reason or ("" if self.ticked() else "tick at least one variant")
        send = send or ("" if self.session_model.has_chat_template() else "this model has no chat template")
        self.set_reasons({self.chat.send_btn: (send, "send the message to every ticked variant (Ctrl+Enter)")})
        self.chat.stop_btn.setEnabled(running)
        self.chat.new_btn.setEnabled(not running)
        share = reason or ("" if self._shown is not None else "run a comparison first")
        self.set_reasons({self.share_btn: (share, "copy the comparison as Markdown, or save it as an HTML report")})
        self.variants.update_buttons(reason, running)

    def settings(self) -> GenerationSettings:
        return self.decoding.settings(use_chat_template=self.prompt_box.chat_check.isChecked())

    # -- prompts ----------------------------------------------------------------------------------------------------
    def set_prompts(self, prompts: list[str], labels: list[str] | None = None) -> None:
        """Fill the prompt selector; the first prompt goes into the box."""
        self.prompt_box.set_prompts(prompts, labels)
        self.update_buttons()

    def browse_prompts(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load prompts", str(Path.home()), "Prompt lists (*.txt *.jsonl *.ndjson);;All files (*)"
        )
        if path:
            self.load_prompts_file(path)

    def load_prompts_file(self, path: str) -> Job | None:
        """Read a .txt/.jsonl prompt list off the GUI thread (a side job: it does not touch the model)."""
        from lora_studio.core.generation.prompts import load_prompts

        def done(prompts: list[str]) -> None:
            self.set_prompts(prompts)
            self.show_message(f"{len(prompts)} prompts from {Path(path).name}", "ok")

        return (
            self.op(
                f"reading {Path(path).name}",
                lambda *, cancel, report: load_prompts(path),
                exclusive=False,
                key="compare-prompts",
                progress=False,
            )
            .on_success(done)
            .on_cancel(lambda: None)
            .run()
        )

    def prefill_demo(self) -> None:
        """--demo: each demo adapter's prompt in the selector (first selected), base and demo adapters ticked."""
        from lora_studio.core.demo import assets as demo_assets

        try:
            prompts = demo_assets.demo_prompts()
        except UserError as exc:
            self.show_message(str(exc), "warn")
            return
        attached = {a[0] for a in self.state.adapters}
        chosen = {name: p for name, p in prompts.items() if name in attached} or prompts
        self.set_prompts(list(chosen.values()), [f"{name}: {p}" for name, p in chosen.items()])
        self.set_ticked([self.base_name(), *[name for name in chosen if name in attached]])
        self.show_message("demo: one prompt per adapter is ready; press Run to compare them", "ok")

    # -- run --------------------------------------------------------------------------------------------------------
    def _variants(self, ticked: list[tuple[str, str]]):
        from lora_studio.core.compare import Variant

        out = []
        for name, kind in ticked:
            if kind == KIND_BASE:
                out.append(Variant.base(name))
            elif kind == KIND_ADAPTER:
                out.append(Variant.of_adapter(name))
            else:
                out.append(Variant.merged(self.merged[name], name))
        return out

    def run(self) -> Job | None:
        """Start the comparison job for the prompt in the box; returns the Job, or None after saying why."""
        return self._start([self.prompt_box.text()])

    def run_all(self) -> Job | None:
        """One job for every prompt of the loaded list; the prompt bar then picks which one the columns show."""
        if not self.prompts:
            self.show_message("no prompt list is loaded (load one with Load prompts…)", "error")
            return None
        return self._start(list(self.prompts))

    def _run_key(self) -> None:
        if self.chat_mode:
            if self.chat.send_btn.isEnabled():
                self.send_chat(self.chat.input.toPlainText())
        elif self.run_btn.isEnabled():
            self.run()

    def _start(self, prompts: list[str]) -> Job | None:
        settings = self.settings()
        ticked = self.ticked()
        try:
            if not self.state.base:
                raise UserError("load a base model first", "pick one on the left")
            if not ticked:
                raise UserError("no variants are ticked", "tick at least one variant")
            for number, prompt in enumerate(prompts, start=1):
                try:
                    validate(settings, prompt)
                except UserError as exc:
                    if len(prompts) == 1:
                        raise
                    raise UserError(f"prompt {number}: {exc.message}", exc.hint) from exc
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        reference = self.variants.reference()
        variants = self._variants(ticked)
        buffer = DeltaBuffer()
        session = self.session
        self._pending_variants = variants

        mixed = not self.decoding.one_at_a_time.isChecked()

        def fn(*, cancel, report):
            return run_comparison(
                session, variants, prompts, settings, reference, buffer, mixed=mixed, cancel=cancel, report=report
            )

        what = f"comparing {len(variants)} variants" + (f" on {len(prompts)} prompts" if len(prompts) > 1 else "")
        job = self.op(what, fn).on_end(self._end_run).on_success(self._done).on_cancel(self._cancelled).run()
        if job is None:
            return None
        self._buffer = buffer
        self.job = job
        self.results.start_run(prompts, ticked)
        mode = (
            "greedy"
            if not settings.do_sample
            else f"sampling T={settings.temperature:g} top-p={settings.top_p:g} seed={settings.seed}"
        )
        self.note.setText(f"{mode}, up to {settings.max_new_tokens} new tokens")
        self.show_message(f"{what}…")
        self._flush_timer.start()
        self.update_buttons()
        return job

    def stop(self) -> None:
        if self.cancel_job(self.job, "stopping…", "warn"):
            self.stop_btn.setEnabled(False)

    def flush(self) -> None:
        """Draw what the worker streamed since the last tick (the timer's slot)."""
        if self._chat_buffer is not None:
            for (_turn, variant), (text, _count) in self._chat_buffer.drain_prompts().items():
                if variant in self.chat.names():
                    self.chat.column(variant).append(text)
            return
        self.results.add_streamed(self._buffer.drain_prompts())

    def _end_run(self) -> None:
        self._flush_timer.stop()
        self.flush()
        self.job = None
        self.results.end_run()

    def _done(self, outcome: RunOutcome) -> None:
        self.results.show_outcome(outcome)
        result = outcome.result
        self._shown = (result, self._pending_variants)
        reference = result.prompts[0].divergence.reference
        on = f" on {len(result.prompts)} prompts" if len(result.prompts) > 1 else ""
        self.show_message(f"compared {len(result.variants)} variants{on} against {reference}", "ok")
        self.run_finished.emit(outcome)
        self.update_buttons()

    # -- chat -------------------------------------------------------------------------------------------------------
    @property
    def chat_mode(self) -> bool:
        return self.pages.currentWidget() is self.chat

    def set_chat_mode(self, on: bool) -> None:
        self.pages.setCurrentWidget(self.chat if on else self.prompts_page)
        if on != self.chat_mode_btn.isChecked():
            self.chat_mode_btn.setChecked(on)
        if on:
            self.chat.input.setFocus()
        self.update_buttons()

    def new_chat(self) -> None:
        """Forget the conversation; the system prompt in the box applies to the new one."""
        system = self.chat.system_edit.text().strip() or None
        self.conversation = Conversation(system=system)
        self.chat.build(self.ticked())
        self.chat.note.setText("")

    def _chat_turns(self, name: str) -> list[tuple[str, str, bool]]:
        turns = [t for t in self.conversation.turns if name in t.replies]
        return [(t.user, t.replies[name].text, t.replies[name].stopped) for t in turns]

    def send_chat(self, text: str) -> Job | None:
        """One turn: every ticked variant answers ``text`` after its own history (core chat_turn, one job)."""
        from lora_studio.core.compare.chat import chat_turn

        settings = self.decoding.settings(use_chat_template=True)
        try:
            if not self.state.base:
                raise UserError("load a base model first", "pick one on the left")
            if not self.ticked():
                raise UserError("no variants are ticked", "tick at least one variant")
            if not text.strip():
                raise UserError("the message is empty", "type a message")
            validate(settings, text)
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        if not self._chat_follows_ticks():  # the ticks changed while a job ran
            self.new_chat()
        variants = self._variants(self.ticked())
        conversation, session, buffer = self.conversation, self.session, DeltaBuffer()
        mixed = not self.decoding.one_at_a_time.isChecked()

        def fn(*, cancel, report):
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
        job = (
            self.op(what, fn)
            .on_end(self._end_chat)
            .on_success(self._chat_done)
            .on_cancel(lambda: self._chat_stopped(text))
            .run()
        )
        if job is None:
            return None
        self.job, self._chat_buffer = job, buffer
        for column in self.chat.columns:
            column.begin_reply(self._chat_turns(column.name), text)
        self.chat.input.clear()
        self._flush_timer.start()
        self.show_message(f"{what}…")
        self.update_buttons()
        return job

    def _end_chat(self) -> None:
        self._flush_timer.stop()
        self.flush()
        self._chat_buffer = None
        self.job = None

    def _chat_done(self, turn: ChatTurn) -> None:
        self.conversation.turns.append(turn)
        for column in self.chat.columns:
            column.show_turns(self._chat_turns(column.name))
        how = "one mixed batch" if turn.mixed_batch else f"sequential: {turn.fallback_reason}"
        if turn.inexact_reason:
            how += f" (note: {turn.inexact_reason} — tick one at a time)"
        self.chat.note.setText(f"turn {len(self.conversation.turns)} · {how} · {turn.seconds:.1f} s")
        self.show_message(f"{len(turn.replies)} variants answered", "ok")
        self.update_buttons()

    def _chat_stopped(self, text: str) -> None:
        """Stop: what each variant said so far stays in its history, marked stopped."""
        replies = {c.name: ChatReply(c.name, c.streamed.strip(), stopped=True) for c in self.chat.columns}
        self.conversation.turns.append(ChatTurn(text, replies))
        for column in self.chat.columns:
            column.show_turns(self._chat_turns(column.name))
        self.show_message("stopped; the partial replies stay in the conversation", "warn")
        self.update_buttons()

    # -- scale ------------------------------------------------------------------------------------------------------
    def set_adapter_scale(self, adapter: str, scale: float) -> Job | None:
        """Run ``adapter`` at ``scale`` from now on (PEFT's set_scale); the last comparison runs again with it."""
        session = self.session

        def fn(*, cancel, report):
            session.set_scale(adapter, scale)

        def done(_result: Any) -> None:
            self.show_message(f"{adapter} runs at scale {scale:g}", "ok")
            if self._shown is not None and self.job is None:  # the comparison on screen, again
                self._start([p.prompt for p in self._shown[0].prompts])

        return self.op(f"setting {adapter}'s scale", fn, progress=False).on_success(done).run()

    # -- share ------------------------------------------------------------------------------------------------------
    def _with_report(self, name: str, then: Any) -> Job | None:
        """Build the last comparison's shareable document (hashes read on a worker), then ``then(doc)``."""
        if self._shown is None:
            return None
        from lora_studio.core.evaluate.run import comparison_report

        (result, variants), session = self._shown, self.session

        def fn(*, cancel, report):
            return comparison_report(session, result, variants)

        return self.op(name, fn, progress=False).on_success(then).run()

    def copy_markdown(self) -> Job | None:
        from lora_studio.core.report.share import render

        def copy(doc: dict) -> None:
            QApplication.clipboard().setText(render(doc, "markdown"))
            self.show_message("the comparison is on the clipboard as Markdown", "ok")

        return self._with_report("copying the comparison", copy)

    def save_report(self) -> None:
        path = self.ask_report_path("Save the comparison", "comparison.html")
        if path is not None:
            self.write_report(path)

    def write_report(self, path: Path) -> Job | None:
        from lora_studio.core.report.share import write_report

        def write(doc: dict) -> None:
            def fn(*, cancel, report):
                return write_report(doc, path, overwrite=True)  # the dialog asked before replacing

            self.op("saving the report", fn, exclusive=False, key="compare-report", progress=False).on_success(
                lambda written: self.show_message(f"report saved: {written}", "ok")
            ).run()

        return self._with_report("preparing the report", write)

    def _show_summary(self, note: str, tooltip: str) -> None:
        self.note.setText(note)
        self.note.setToolTip(tooltip)

    def _cancelled(self) -> None:
        self.note.setText(f"stopped after {max((c.tokens for c in self.columns), default=0)} tokens per column")
        self.show_message("comparison stopped", "warn")

    # -- variants made here (the Merge tab previews through these two) ------------------------------------------------
    def add_combination_variant(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None:
        """Create a weighted combination of attached adapters on the session (a job), then tick it as a column."""
        session = self.session
        weights = dict(weights)

        def fn(*, cancel, report):
            session.register_combination(name, weights, combination_type, density)

        def done(_result) -> None:
            self.variants.unticked.discard(name)
            self.variants.fill()
            label = " + ".join(f"{a}×{w:g}" for a, w in weights.items())
            self.show_message(f"{name} = {combination_type}({label}) is ready to compare", "ok")

        what = f"combining into {name}"
        return self.op(what, fn, progress=False).on_success(done).run(f"{what}…")

    def add_merged_variant(self, path: str, against: Sequence[str] = ()) -> Job | None:
        """Load a merged model folder beside the session and tick it as a column (see :meth:`MergedFolders.add`)."""
        return self.merged_folders.add(path, against)
