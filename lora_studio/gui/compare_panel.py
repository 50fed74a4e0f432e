"""The Compare tab: the same prompt through several variants side by side, streamed, with divergence marks.

The variants (compare_variants.py) are the base, every adapter on the session and merged folders
loaded beside it; each ticked one becomes a column (compare_columns.py). One Run is one model job on
the window's runner (compare_stream.run_comparison): tokens arrive on the worker thread, are queued in
a DeltaBuffer and drawn by a ~30 Hz timer. After a run every column is marked where it first differs
from the reference column, with the per-token KL against it in a strip.

"Run all prompts" runs the loaded prompt list in one job (core compare takes several prompts); a
prompt bar above the columns picks which prompt's results the columns show, while it streams and after.
The Merge tab's "Compare merged vs adapter" lands in :meth:`ComparePanel.add_merged_variant` with the
adapters the folder came from: exactly those columns are ticked, the adapter being the reference.

The GUI thread never calls into the model: merged models travel as opaque references from the job
that loaded them to the job that compares them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QTabBar,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.errors import UserError
from lora_studio.core.generation.generate import GenerationSettings, validate
from lora_studio.core.session import SessionState
from lora_studio.gui.compare_columns import (
    DIVERGED_BACKGROUND,
    KIND_ADAPTER,
    KIND_BASE,
    KIND_MERGED,
    ColumnView,
    strip_legend,
)
from lora_studio.gui.compare_inputs import DecodingBox, PromptBox
from lora_studio.gui.compare_stream import DeltaBuffer, RunOutcome, run_comparison
from lora_studio.gui.compare_variants import VariantPicker
from lora_studio.gui.jobs import Job, JobRunner
from lora_studio.gui.ops import unique_name
from lora_studio.gui.panel import Panel
from lora_studio.gui.session_model import SessionModel

FLUSH_INTERVAL_MS = 33  # ~30 redraws a second while tokens stream
SIDE_WIDTH = 215  # the variant list and decoding box; the rest of the tab is the columns'
PROMPT_TAB_LABEL = 22  # characters of a prompt on its tab in the prompt bar
RUN_KEYS = ("Ctrl+Return", "Ctrl+Enter")  # Return on the main keyboard, Enter on the keypad
LEGEND = (
    "<b>Reading the columns</b><br>"
    f"<span style='background:{DIVERGED_BACKGROUND}'>&nbsp;highlighted&nbsp;</span> from the first token "
    "that differs from the reference column.<br>"
    "The strip under each column: KL(reference ‖ column) per reference token, pale = same "
    "distribution, red = far apart; hover a cell for the token, its log-probability and KL. "
    "The black tick marks the first divergence."
)


class ComparePanel(Panel):
    run_finished = Signal(object)  # RunOutcome

    def __init__(self, runner: JobRunner, session_model: SessionModel, parent: QWidget | None = None) -> None:
        super().__init__(runner, session_model, parent)
        self.columns: list[ColumnView] = []
        self.job: Job | None = None
        self.outcome: RunOutcome | None = None
        self._buffer = DeltaBuffer()
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(FLUSH_INTERVAL_MS)
        self._flush_timer.timeout.connect(self.flush)
        self._template_for: str | None = None  # the base whose tokenizer the chat toggle follows
        self.run_prompts: list[str] = []  # the prompts of the last run, one prompt-bar tab each
        self.shown_prompt = 0  # which of them the columns show
        self._streamed: dict[tuple[int, str], tuple[str, int]] = {}  # (prompt, variant) -> text and tokens so far

        self.variants = VariantPicker()
        self.variants.ticks_changed.connect(self._ticks_changed)
        self.variants.current_changed.connect(self.update_buttons)
        self.variants.add_merged_btn.clicked.connect(self.browse_merged)
        self.variants.remove_btn.clicked.connect(self.remove_selected_merged)
        self.reference_combo = self.variants.reference_combo
        self.decoding = DecodingBox()
        self.max_tokens = self.decoding.max_tokens
        self.prompt_box = PromptBox()
        self.prompt_box.load_btn.clicked.connect(self.browse_prompts)
        self.prompt_edit, self.prompt_select = self.prompt_box.edit, self.prompt_box.select

        side = QWidget()
        slay = QVBoxLayout(side)
        slay.setContentsMargins(0, 0, 0, 0)
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
        self.note = QLabel("")
        self.note.setStyleSheet("color: palette(mid);")
        self.note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # a long note (a sequential run's reason) is cut, not allowed to widen the tab; the tooltip has it all
        self.note.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_btn)
        run_row.addWidget(self.run_all_btn)
        run_row.addWidget(self.stop_btn)
        self.progress.setMinimumWidth(200)  # "generating: 270/768 tokens" in full
        run_row.addWidget(self.progress, 1)
        run_row.addWidget(self.note, 2)
        # Ctrl+Enter runs from anywhere in the tab (the prompt box included); Tab leaves the prompt box
        self.run_shortcuts = [QShortcut(QKeySequence(keys), self) for keys in RUN_KEYS]
        for shortcut in self.run_shortcuts:
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(self._run_key)

        # the prompt bar (one tab per prompt of a "Run all prompts" run) and what the marks mean
        self.prompt_tabs = QTabBar()
        self.prompt_tabs.setDocumentMode(True)
        self.prompt_tabs.setExpanding(False)
        self.prompt_tabs.setUsesScrollButtons(True)
        self.prompt_tabs.setElideMode(Qt.TextElideMode.ElideRight)
        self.prompt_tabs.currentChanged.connect(self.show_prompt)
        self.prompt_tabs.hide()
        self.legend = strip_legend()
        self.legend.setToolTip(LEGEND)
        results_row = QHBoxLayout()
        results_row.addWidget(self.prompt_tabs, 1)
        results_row.addStretch(0)
        results_row.addWidget(self.legend)

        # columns
        self.column_splitter = QSplitter(Qt.Orientation.Horizontal)
        self.column_splitter.setChildrenCollapsible(False)
        self.columns_scroll = QScrollArea()
        self.columns_scroll.setWidgetResizable(True)
        self.columns_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.columns_scroll.setWidget(self.column_splitter)
        self.empty_label = QLabel("Tick variants on the left; each becomes a column here.")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setStyleSheet("color: palette(mid);")

        main = QWidget()
        mlay = QVBoxLayout(main)
        mlay.setContentsMargins(0, 0, 0, 0)
        mlay.addWidget(self.prompt_box)
        mlay.addLayout(run_row)
        mlay.addWidget(self.message)
        mlay.addLayout(results_row)
        mlay.addWidget(self.empty_label)
        mlay.addWidget(self.columns_scroll, 1)

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
            self._release_merged(self.variants.take_merged())  # loaded beside another base: no longer comparable
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

    def _ticks_changed(self) -> None:
        if self.job is None:
            self._build_columns(self.ticked())
            self.run_prompts = []  # fresh columns: the last run's prompt bar no longer applies
            self._fill_prompt_tabs([])
        self.update_buttons()

    def _build_columns(self, variants: list[tuple[str, str]]) -> None:
        for column in self.columns:
            column.hide()
            column.setParent(None)  # out of the splitter now; freed when the last reference goes
        self.columns = [ColumnView(name, kind) for name, kind in variants]
        for column in self.columns:
            self.column_splitter.addWidget(column)
            column.strip.hovered.connect(self._token_hovered)
        if self.columns:
            self.column_splitter.setSizes([1000] * len(self.columns))
        self.empty_label.setVisible(not self.columns)
        self.columns_scroll.setVisible(bool(self.columns))

    def column(self, name: str) -> ColumnView:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

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
        if self.run_btn.isEnabled():
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

        def fn(*, cancel, report):
            return run_comparison(session, variants, prompts, settings, reference, buffer, cancel=cancel, report=report)

        what = f"comparing {len(variants)} variants" + (f" on {len(prompts)} prompts" if len(prompts) > 1 else "")
        job = self.op(what, fn).on_end(self._end_run).on_success(self._done).on_cancel(self._cancelled).run()
        if job is None:
            return None
        self._buffer = buffer
        self.job = job
        self.outcome = None
        self._streamed = {}
        self.run_prompts = list(prompts)
        self.shown_prompt = 0
        self._build_columns(ticked)
        self._fill_prompt_tabs(prompts)
        for column in self.columns:
            column.text.setPlaceholderText("waiting for the first token…")
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

    def _fill_prompt_tabs(self, prompts: list[str]) -> None:
        """One tab per prompt of a several-prompt run (hidden for one prompt)."""
        self.prompt_tabs.blockSignals(True)
        while self.prompt_tabs.count():
            self.prompt_tabs.removeTab(0)
        if len(prompts) > 1:
            for number, prompt in enumerate(prompts, start=1):
                words = " ".join(prompt.split())
                short = words if len(words) <= PROMPT_TAB_LABEL else words[: PROMPT_TAB_LABEL - 1] + "…"
                index = self.prompt_tabs.addTab(f"{number}: {short}")
                self.prompt_tabs.setTabToolTip(index, prompt)
            self.prompt_tabs.setCurrentIndex(0)
        self.prompt_tabs.blockSignals(False)
        self.prompt_tabs.setVisible(len(prompts) > 1)

    def show_prompt(self, index: int) -> None:
        """Show prompt ``index`` of the last run in the columns: what it streamed so far, or its finished result."""
        if not 0 <= index < len(self.run_prompts):
            return
        if self.prompt_tabs.currentIndex() != index and self.prompt_tabs.count() > index:
            self.prompt_tabs.setCurrentIndex(index)  # the tab bar's signal calls back here with the same index
            return
        self.shown_prompt = index
        for column in self.columns:
            column.reset()
            text, tokens = self._streamed.get((index, column.name), ("", 0))
            if text or tokens:
                column.append(text, tokens)
        if self.outcome is not None:
            self._show_result(index)

    def _token_hovered(self, index: int | None) -> None:
        """A KL-strip cell is under the mouse: its reference token lights up in every column that holds it."""
        for column in self.columns:
            column.highlight_token(index)

    def stop(self) -> None:
        if self.cancel_job(self.job, "stopping…", "warn"):
            self.stop_btn.setEnabled(False)

    def flush(self) -> None:
        """Draw what the worker streamed since the last tick (the timer's slot)."""
        for (prompt, variant), (text, tokens) in self._buffer.drain_prompts().items():
            old_text, old_tokens = self._streamed.get((prompt, variant), ("", 0))
            self._streamed[(prompt, variant)] = (old_text + text, old_tokens + tokens)
            if prompt != self.shown_prompt:
                continue
            with contextlib.suppress(KeyError):  # a column unticked since the run started
                self.column(variant).append(text, tokens)

    def _end_run(self) -> None:
        self._flush_timer.stop()
        self.flush()
        self.job = None
        for column in self.columns:
            column.text.setPlaceholderText("")

    def _done(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        result = outcome.result
        self._show_result(self.shown_prompt)
        reference = result.prompts[0].divergence.reference
        on = f" on {len(result.prompts)} prompts" if len(result.prompts) > 1 else ""
        self.show_message(f"compared {len(result.variants)} variants{on} against {reference}", "ok")
        self.run_finished.emit(outcome)

    def _show_result(self, index: int) -> None:
        """Prompt ``index`` of the finished run: final texts, divergence marks, strips, headers and the note."""
        assert self.outcome is not None
        result = self.outcome.result
        cmp = result.prompts[index]
        display = self.outcome.displays[index]
        report = cmp.divergence
        for column in self.columns:
            try:
                output = cmp.output(column.name)
            except KeyError:
                continue
            column.finish(
                output,
                report.column(column.name),
                report.reference,
                display.reference_pieces,
                display.divergence_offsets.get(column.name),
                display.token_spans,
            )
        how = "one mixed batch" if result.mixed_batch else f"sequential: {result.fallback_reason}"
        merged = sum(1 for c in self.columns if c.kind == KIND_MERGED)
        if merged and result.mixed_batch:
            how += f" (+{merged} merged folder{'s' if merged > 1 else ''} on its own)"
        several = len(result.prompts) > 1
        which = f"prompt {index + 1}/{len(result.prompts)}, {cmp.prompt_token_count} tokens"
        prompt = which if several else f"prompt {cmp.prompt_token_count} tokens"
        self.note.setText(f"{how} · {result.seconds:.1f} s · {prompt}")
        self.note.setToolTip(self.note.text() + (f"\n\n{cmp.prompt}" if several else ""))

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

    def browse_merged(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a merged model folder", str(Path.home()))
        if path:
            self.add_merged_variant(path)

    def add_merged_variant(self, path: str, against: Sequence[str] = ()) -> Job | None:
        """Load a merged model folder read-only beside the session (a job), then tick it as a column.

        ``against``: the adapters the folder was merged from ("Compare merged vs adapter"): then exactly the
        merged column and those adapters are ticked, the first adapter being the reference, and a folder
        already loaded beside the session is reused rather than loaded twice.
        """
        from lora_studio.core.compare import load_beside

        against = list(against)
        loaded = self.variants.merged_named_for(str(path)) if against else None
        if loaded is not None:
            self._tick_merged_against(loaded, against)
            return None
        session = self.session
        stem = Path(path).name or "merged"
        name = unique_name(stem, (n for n, _ in self.available_variants()))

        def fn(*, cancel, report):
            return load_beside(path, session, cancel=cancel, report=report)

        def done(beside) -> None:
            self.variants.add_merged(name, beside, str(path))
            if against:
                self._tick_merged_against(name, against)
            else:
                self.show_message(f"{name}: merged folder loaded beside the base, ready to compare", "ok")

        what = f"loading {stem} beside the base"
        return self.op(what, fn, progress=False).on_success(done).run(f"{what}…")

    def _tick_merged_against(self, merged: str, adapters: list[str]) -> None:
        """Tick exactly ``merged`` and the ``adapters`` it came from; the first attached one is the reference."""
        attached = {name for name, kind in self.available_variants() if kind == KIND_ADAPTER}
        sources = [a for a in adapters if a in attached]
        reference = sources[0] if sources else self.base_name()  # its adapters are gone: against the base then
        self.set_ticked([merged, *sources] if sources else [merged, reference])
        self.variants.set_reference(reference)
        gone = [a for a in adapters if a not in attached]
        note = f" ({', '.join(gone)} no longer attached)" if gone else ""
        self.show_message(f"{merged} against {reference}{note}: press Run to compare", "ok")

    def remove_selected_merged(self) -> None:
        name = self.variants.selected_merged()
        if name is None:
            return
        self._release_merged(self.variants.take_merged([name]))
        self.variants.fill()
        self.show_message(f"unloaded {name}", "ok")

    def _release_merged(self, held: list) -> None:
        if not held:
            return
        from lora_studio.core.session import release_memory

        # The last reference goes away on a worker, where freeing the model's memory is allowed to take a while.
        def fn(*, cancel, report):
            held.clear()
            release_memory()

        try:
            self.runner.submit("unloading merged models", fn, exclusive=False)
        except Exception:  # noqa: BLE001 - the references are dropped here then; nothing to tell
            held.clear()
