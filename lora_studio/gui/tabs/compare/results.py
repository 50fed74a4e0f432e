"""The Compare tab's results: the prompt bar, the KL legend and one column per ticked variant.

A run streams into :meth:`CompareResults.add_streamed` (what the panel's timer drained, keyed by prompt and
variant); every prompt's text is kept, so the prompt bar (one tab per prompt of a "Run all prompts" run) can
show any of them while the run goes on and after it. When the run ends, :meth:`show_outcome` draws the final
texts, the divergence marks and the KL strips of the prompt shown, and says how it ran through
:attr:`CompareResults.summary_changed` (the note beside the run bar).
"""

from __future__ import annotations

import contextlib

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QScrollArea, QSplitter, QTabBar, QVBoxLayout, QWidget

from lora_studio.gui.tabs.compare.columns import DIVERGED_BACKGROUND, KIND_MERGED, ColumnView, strip_legend
from lora_studio.gui.tabs.compare.stream import RunOutcome

PROMPT_TAB_LABEL = 22  # characters of a prompt on its tab in the prompt bar
LEGEND = (
    "<b>Reading the columns</b><br>"
    f"<span style='background:{DIVERGED_BACKGROUND}'>&nbsp;highlighted&nbsp;</span> from the first token "
    "that differs from the reference column.<br>"
    "The strip under each column: KL(reference ‖ column) per reference token, pale = same "
    "distribution, red = far apart; hover a cell for the token, its log-probability and KL. "
    "The black tick marks the first divergence."
)


class CompareResults(QWidget):
    summary_changed = Signal(str, str)  # (note, its tooltip): how the shown prompt's run went

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.columns: list[ColumnView] = []
        self.outcome: RunOutcome | None = None
        self.run_prompts: list[str] = []  # the prompts of the last run, one prompt-bar tab each
        self.shown_prompt = 0  # which of them the columns show
        self._streamed: dict[tuple[int, str], tuple[str, int]] = {}  # (prompt, variant) -> text and tokens so far

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

        self.column_splitter = QSplitter(Qt.Orientation.Horizontal)
        self.column_splitter.setChildrenCollapsible(False)
        self.columns_scroll = QScrollArea()
        self.columns_scroll.setWidgetResizable(True)
        self.columns_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.columns_scroll.setWidget(self.column_splitter)
        self.empty_label = QLabel("Tick variants on the left; each becomes a column here.")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setStyleSheet("color: palette(mid);")

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(results_row)
        layout.addWidget(self.empty_label)
        layout.addWidget(self.columns_scroll, 1)

    # -- columns -------------------------------------------------------------------------------------------------------
    def build_columns(self, variants: list[tuple[str, str]]) -> None:
        """One fresh column per ``(name, kind)``; the old ones go."""
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

    def show_ticked(self, variants: list[tuple[str, str]]) -> None:
        """The ticks changed between runs: fresh columns, and the last run's prompt bar no longer applies."""
        self.build_columns(variants)
        self.run_prompts = []
        self.fill_prompt_tabs([])

    def _token_hovered(self, index: int | None) -> None:
        """A KL-strip cell is under the mouse: its reference token lights up in every column that holds it."""
        for column in self.columns:
            column.highlight_token(index)

    # -- the prompt bar ------------------------------------------------------------------------------------------------
    def fill_prompt_tabs(self, prompts: list[str]) -> None:
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

    def forget(self) -> None:
        """No run (another base was loaded): the columns empty, the run's note gone."""
        self.outcome = None
        self._streamed = {}
        for column in self.columns:
            column.reset()
            column.text.setPlaceholderText("press Run")
        self.summary_changed.emit("", "")

    # -- a run ---------------------------------------------------------------------------------------------------------
    def start_run(self, prompts: list[str], variants: list[tuple[str, str]]) -> None:
        """A run of ``prompts`` through ``variants`` begins: fresh columns waiting, the first prompt shown."""
        self.outcome = None
        self._streamed = {}
        self.run_prompts = list(prompts)
        self.shown_prompt = 0
        self.build_columns(variants)
        self.fill_prompt_tabs(prompts)
        for column in self.columns:
            column.text.setPlaceholderText("waiting for the first token…")

    def add_streamed(self, drained: dict[tuple[int, str], tuple[str, int]]) -> None:
        """Text the worker streamed, keyed by (prompt index, variant); the shown prompt's goes into its columns."""
        for (prompt, variant), (text, tokens) in drained.items():
            old_text, old_tokens = self._streamed.get((prompt, variant), ("", 0))
            self._streamed[(prompt, variant)] = (old_text + text, old_tokens + tokens)
            if prompt != self.shown_prompt:
                continue
            with contextlib.suppress(KeyError):  # a column unticked since the run started
                self.column(variant).append(text, tokens)

    def end_run(self) -> None:
        for column in self.columns:
            column.text.setPlaceholderText("")

    def show_outcome(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        self._show_result(self.shown_prompt)

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
                limit=result.settings.max_new_tokens,
            )
        how = "one mixed batch" if result.mixed_batch else f"sequential: {result.fallback_reason}"
        if result.inexact_reason:
            how += f" (note: {result.inexact_reason} — tick one at a time)"
        merged = sum(1 for c in self.columns if c.kind == KIND_MERGED)
        if merged and result.mixed_batch:
            how += f" (+{merged} merged folder{'s' if merged > 1 else ''} on its own)"
        several = len(result.prompts) > 1
        which = f"prompt {index + 1}/{len(result.prompts)}, {cmp.prompt_token_count} tokens"
        prompt = which if several else f"prompt {cmp.prompt_token_count} tokens"
        note = f"{how} · {result.seconds:.1f} s · {prompt}"
        self.summary_changed.emit(note, note + (f"\n\n{cmp.prompt}" if several else ""))
