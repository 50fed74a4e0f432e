"""The Compare tab: the same prompt through several variants side by side, streamed, with divergence marks.

The variants (compare_variants.py) are the base, every adapter on the session and merged folders
loaded beside it; each ticked one becomes a column (compare_columns.py). One Run is one model job on
the window's runner (compare_stream.run_comparison): tokens arrive on the worker thread, are queued in
a DeltaBuffer and drawn by a ~30 Hz timer. After a run every column is marked where it first differs
from the reference column, with the per-token KL against it in a strip.

The GUI thread never calls into the model: merged models travel as opaque references from the job
that loaded them to the job that compares them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.errors import UserError
from lora_studio.core.generation.generate import GenerationSettings, validate
from lora_studio.core.session import SessionState
from lora_studio.gui.compare_columns import DIVERGED_BACKGROUND, KIND_ADAPTER, KIND_BASE, KIND_MERGED, ColumnView
from lora_studio.gui.compare_inputs import DecodingBox, PromptBox
from lora_studio.gui.compare_stream import DeltaBuffer, RunOutcome, run_comparison
from lora_studio.gui.compare_variants import VariantPicker
from lora_studio.gui.jobs import Job, JobRunner
from lora_studio.gui.ops import unique_name
from lora_studio.gui.panel import Panel
from lora_studio.gui.session_model import SessionModel

FLUSH_INTERVAL_MS = 33  # ~30 redraws a second while tokens stream
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
        legend = QLabel(LEGEND)
        legend.setWordWrap(True)
        legend.setStyleSheet("color: palette(dark); font-size: 9pt;")
        slay.addWidget(legend)

        # run bar
        self.run_btn = QPushButton("Run")
        self.run_btn.setDefault(True)
        self.run_btn.clicked.connect(self.run)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.clicked.connect(self.stop)
        self.note = QLabel("")
        self.note.setStyleSheet("color: palette(mid);")
        self.note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_btn)
        run_row.addWidget(self.stop_btn)
        run_row.addWidget(self.progress, 1)
        run_row.addWidget(self.note, 2)

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
        mlay.addWidget(self.empty_label)
        mlay.addWidget(self.columns_scroll, 1)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(side)
        splitter.addWidget(main)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([250, 1000])
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
        self.update_buttons()

    def _build_columns(self, variants: list[tuple[str, str]]) -> None:
        for column in self.columns:
            column.hide()
            column.setParent(None)  # out of the splitter now; freed when the last reference goes
        self.columns = [ColumnView(name, kind) for name, kind in variants]
        for column in self.columns:
            self.column_splitter.addWidget(column)
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
        self.set_reasons({self.run_btn: (reason, "run the prompt through every ticked variant")})
        self.stop_btn.setEnabled(running)
        self.stop_btn.setToolTip("stop the comparison within one decoding step" if running else "nothing is running")
        self.variants.update_buttons(reason, running)

    def settings(self) -> GenerationSettings:
        return self.decoding.settings(use_chat_template=self.prompt_box.chat_check.isChecked())

    # -- prompts ----------------------------------------------------------------------------------------------------
    def set_prompts(self, prompts: list[str], labels: list[str] | None = None) -> None:
        """Fill the prompt selector; the first prompt goes into the box."""
        self.prompt_box.set_prompts(prompts, labels)

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
        """Start the comparison job; returns the Job, or None after saying why in the message line."""
        prompt = self.prompt_box.text()
        settings = self.settings()
        ticked = self.ticked()
        try:
            if not self.state.base:
                raise UserError("load a base model first", "pick one on the left")
            if not ticked:
                raise UserError("no variants are ticked", "tick at least one variant")
            validate(settings, prompt)
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        reference = self.variants.reference()
        variants = self._variants(ticked)
        buffer = DeltaBuffer()
        session = self.session

        def fn(*, cancel, report):
            return run_comparison(session, variants, prompt, settings, reference, buffer, cancel=cancel, report=report)

        job = (
            self.op(f"comparing {len(variants)} variants", fn)
            .on_end(self._end_run)
            .on_success(self._done)
            .on_cancel(self._cancelled)
            .run()
        )
        if job is None:
            return None
        self._buffer = buffer
        self.job = job
        self.outcome = None
        self._build_columns(ticked)
        for column in self.columns:
            column.text.setPlaceholderText("waiting for the first token…")
        mode = (
            "greedy"
            if not settings.do_sample
            else f"sampling T={settings.temperature:g} top-p={settings.top_p:g} seed={settings.seed}"
        )
        self.note.setText(f"{mode}, up to {settings.max_new_tokens} new tokens")
        self.show_message(f"comparing {len(variants)} variants…")
        self._flush_timer.start()
        self.update_buttons()
        return job

    def stop(self) -> None:
        if self.cancel_job(self.job, "stopping…", "warn"):
            self.stop_btn.setEnabled(False)

    def flush(self) -> None:
        """Draw what the worker streamed since the last tick (the timer's slot)."""
        for variant, (text, tokens) in self._buffer.drain().items():
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
        cmp = result.prompts[0]
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
                outcome.reference_pieces,
                outcome.divergence_offsets.get(column.name),
            )
        how = "one mixed batch" if result.mixed_batch else f"sequential: {result.fallback_reason}"
        merged = sum(1 for c in self.columns if c.kind == KIND_MERGED)
        if merged and result.mixed_batch:
            how += f" (+{merged} merged folder{'s' if merged > 1 else ''} on its own)"
        self.note.setText(f"{how} · {result.seconds:.1f} s · prompt {cmp.prompt_token_count} tokens")
        self.note.setToolTip(self.note.text())
        self.show_message(f"compared {len(cmp.outputs)} variants against {report.reference}", "ok")
        self.run_finished.emit(outcome)

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

    def add_merged_variant(self, path: str) -> Job | None:
        """Load a merged model folder read-only beside the session (a job), then tick it as a column."""
        from lora_studio.core.compare import load_beside

        session = self.session
        stem = Path(path).name or "merged"
        name = unique_name(stem, (n for n, _ in self.available_variants()))

        def fn(*, cancel, report):
            return load_beside(path, session, cancel=cancel, report=report)

        def done(beside) -> None:
            self.variants.add_merged(name, beside, str(path))
            self.show_message(f"{name}: merged folder loaded beside the base, ready to compare", "ok")

        what = f"loading {stem} beside the base"
        return self.op(what, fn, progress=False).on_success(done).run(f"{what}…")

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
