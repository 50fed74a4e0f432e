"""The Compare tab: the same prompt through several variants side by side, streamed, with divergence marks.

The variants (variants.py) are the base, every adapter on the session and merged folders loaded beside it
(merged.py); each ticked one becomes a column (columns.py). One Run is one model job on the window's runner
(runs.py): tokens arrive on the worker thread, are queued in a DeltaBuffer (stream.py) and drawn by a ~30 Hz
timer. After a run every column is marked where it first differs from the reference column, with the per-token
KL against it in a strip.

"Run all prompts" runs the loaded prompt list in one job (core compare takes several prompts); a prompt bar
above the columns picks which prompt's results the columns show, while it streams and after (results.py). The
Chat mode (chat_mode.py) holds a conversation instead; Share (share.py) copies or saves the last comparison;
adapter_edits.py sets an adapter's scale or adds a combination. The Merge tab's "Compare merged vs adapter"
lands in :meth:`ComparePanel.add_merged_variant`.

The GUI thread never calls into the model: merged models travel as opaque references from the job that loaded
them to the job that compares them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QTimer, Signal
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import QFileDialog, QStackedWidget, QVBoxLayout, QWidget

from lora_studio.core.errors import UserError
from lora_studio.core.generation.generate import GenerationSettings
from lora_studio.core.session import SessionState
from lora_studio.gui.base.decoding import DecodingBox
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.base.shortcuts import add_run_shortcuts
from lora_studio.gui.base.widgets import side_by_side
from lora_studio.gui.tabs.compare.adapter_edits import AdapterEdits
from lora_studio.gui.tabs.compare.chat import ChatView
from lora_studio.gui.tabs.compare.chat_mode import ChatMode
from lora_studio.gui.tabs.compare.columns import ColumnView
from lora_studio.gui.tabs.compare.inputs import ModeSwitch, PromptBox
from lora_studio.gui.tabs.compare.merged import MergedFolders
from lora_studio.gui.tabs.compare.results import CompareResults
from lora_studio.gui.tabs.compare.run_bar import RunBar
from lora_studio.gui.tabs.compare.runs import ComparisonRuns
from lora_studio.gui.tabs.compare.share import ShareActions
from lora_studio.gui.tabs.compare.stream import RunOutcome
from lora_studio.gui.tabs.compare.variants import VariantPicker

if TYPE_CHECKING:
    from lora_studio.core.compare import BesideModel
    from lora_studio.core.compare.chat import Conversation
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.context import TabContext

FLUSH_INTERVAL_MS = 33  # ~30 redraws a second while tokens stream
SIDE_WIDTH = 215  # the variant list and decoding box; the rest of the tab is the columns'


class ComparePanel(Panel):
    run_finished = Signal(object)  # RunOutcome

    def __init__(self, ctx: TabContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.job: Job | None = None
        self._demo_prompts = False  # the selector holds the demo adapters' prompts (prefill_demo)
        self._columns_stale = False  # the ticks changed while the tab was hidden: columns built when it is shown
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(FLUSH_INTERVAL_MS)
        self._template_for: str | None = None  # the base whose tokenizer the chat toggle follows
        side = self._build_side()
        prompts_page = self._build_prompts_page()
        self._build_modes()
        self._build_layout(side, prompts_page)
        self._connect()
        self.show_state(self.state)

    # -- build steps ---------------------------------------------------------------------------------------------------
    def _build_side(self) -> QWidget:
        """The mode switch, the variant list and the decoding box."""
        self.variants = VariantPicker(self.ctx.store)
        self.merged_folders = MergedFolders(self, self)
        self.decoding = DecodingBox(batching=True)
        self.modes = ModeSwitch()
        side = QWidget()
        layout = QVBoxLayout(side)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.modes)
        layout.addWidget(self.variants, 1)
        layout.addWidget(self.decoding)
        return side

    def _build_prompts_page(self) -> QWidget:
        """The prompt box, the run bar and the columns."""
        self.prompt_box = PromptBox()
        self.share = ShareActions(self)
        self.run_bar = RunBar(self.share.button, self.progress)
        self.results = CompareResults()
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.prompt_box)
        layout.addWidget(self.run_bar)
        layout.addWidget(self.results, 1)
        self.prompts_page = page
        return page

    def _build_modes(self) -> None:
        """What runs: comparisons of prompts (runs.py), or a chat (chat_mode.py) in a view of its own."""
        self.runs = ComparisonRuns(self, self.results, self.run_bar.note, self.share, self)
        self.adapter_edits = AdapterEdits(self, self.runs.rerun)
        self.chat = ChatView()
        self.chat_control = ChatMode(self, self.chat)

    def _build_layout(self, side: QWidget, prompts_page: QWidget) -> None:
        """The side on the left, the prompts page or the chat on the right, the message line under them."""
        self.pages = QStackedWidget()
        self.pages.addWidget(prompts_page)
        self.pages.addWidget(self.chat)
        main = QWidget()
        main_layout = QVBoxLayout(main)
        main_layout.setContentsMargins(0, 0, 0, 0)
        main_layout.addWidget(self.pages, 1)
        main_layout.addWidget(self.message)
        splitter = side_by_side(side, main, (SIDE_WIDTH, 1000))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(splitter)

    def _connect(self) -> None:
        self._flush_timer.timeout.connect(self.flush)
        self.variants.ticks_changed.connect(self._ticks_changed)
        self.variants.current_changed.connect(self.update_buttons)
        self.variants.scale_changed.connect(self.set_adapter_scale)
        self.variants.add_merged_btn.clicked.connect(self.merged_folders.browse)
        self.variants.remove_btn.clicked.connect(self.merged_folders.remove_selected)
        self.prompt_box.load_btn.clicked.connect(self.browse_prompts)
        self.modes.chat_btn.toggled.connect(self.set_chat_mode)
        self.run_bar.run_btn.clicked.connect(self.run)
        self.run_bar.run_all_btn.clicked.connect(self.run_all)
        self.run_bar.stop_btn.clicked.connect(self.stop)
        self.results.summary_changed.connect(self.run_bar.show_summary)
        self.runs.finished.connect(self.run_finished)
        self.chat.send_requested.connect(self.send_chat)
        self.chat.stop_requested.connect(self.stop)
        self.chat.new_chat_requested.connect(self.new_chat)
        # Ctrl+Enter runs from anywhere in the tab (the prompt box included); Tab leaves the prompt box
        self.run_shortcuts = add_run_shortcuts(self, self._run_key)

    # -- state ---------------------------------------------------------------------------------------------------------
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
    def merged(self) -> Mapping[str, BesideModel]:
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

    def set_ticked(self, names: Sequence[str]) -> None:
        """Tick exactly ``names`` (and untick the rest)."""
        self.variants.set_ticked(names)

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
            if not self.chat_control.follows_ticks():
                self.chat_control.ticks_changed()
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

    def showEvent(self, event: QShowEvent) -> None:
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
                self.run_bar.run_btn: (reason, "run the prompt through every ticked variant (Ctrl+Enter)"),
                self.run_bar.run_all_btn: (
                    all_reason,
                    f"run all {count} loaded prompts; the bar above the columns picks one",
                ),
            }
        )
        self.run_bar.stop_btn.setEnabled(running)
        self.run_bar.stop_btn.setToolTip(
            "stop the comparison within one decoding step" if running else "nothing is running"
        )
        send = reason or ("" if self.ticked() else "tick at least one variant")
        send = send or ("" if self.session_model.has_chat_template() else "this model has no chat template")
        self.set_reasons({self.chat.send_btn: (send, "send the message to every ticked variant (Ctrl+Enter)")})
        self.chat.stop_btn.setEnabled(running)
        self.chat.new_btn.setEnabled(not running)
        share = reason or ("" if self.share.shown is not None else "run a comparison first")
        self.set_reasons({self.share.button: (share, "copy the comparison as Markdown, or save it as an HTML report")})
        self.variants.update_buttons(reason, running)

    def settings(self) -> GenerationSettings:
        return self.decoding.settings(use_chat_template=self.prompt_box.chat_check.isChecked())

    # -- prompts -------------------------------------------------------------------------------------------------------
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

        def read(session: Session, *, cancel: CancelToken, report: Report) -> list[str]:
            return load_prompts(path)

        def done(prompts: list[str]) -> None:
            self.set_prompts(prompts)
            self.show_message(f"{len(prompts)} prompts from {Path(path).name}", "ok")

        what = f"reading {Path(path).name}"
        op = self.op(what, read, exclusive=False, key="compare-prompts", progress=False)
        return op.on_success(done).on_cancel(lambda: None).run()

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
        self._demo_prompts = True
        self.set_ticked([self.base_name(), *[name for name in chosen if name in attached]])
        self.show_message("demo: one prompt per adapter is ready; press Run to compare them", "ok")

    # -- run -----------------------------------------------------------------------------------------------------------
    def run(self) -> Job | None:
        """Start the comparison job for the prompt in the box; returns the Job, or None after saying why."""
        return self.runs.start([self.prompt_box.text()])

    def run_all(self) -> Job | None:
        """One job for every prompt of the loaded list; the prompt bar then picks which one the columns show."""
        if not self.prompts:
            self.show_message("no prompt list is loaded (load one with Load prompts…)", "error")
            return None
        return self.runs.start(list(self.prompts))

    def _run_key(self) -> None:
        if self.chat_mode:
            if self.chat.send_btn.isEnabled():
                self.send_chat(self.chat.input.toPlainText())
        elif self.run_bar.run_btn.isEnabled():
            self.run()

    def stop(self) -> None:
        if self.cancel_job(self.job, "stopping…", "warn"):
            self.run_bar.stop_btn.setEnabled(False)

    def start_streaming(self) -> None:
        """The flush timer draws what a job streams, until :meth:`stop_streaming`."""
        self._flush_timer.start()

    def stop_streaming(self) -> None:
        """The job ended: the timer stops, and what it streamed last is drawn."""
        self._flush_timer.stop()
        self.flush()

    def flush(self) -> None:
        """Draw what the worker streamed since the last tick (the timer's slot)."""
        if self.chat_control.buffer is not None:
            self.chat_control.flush()
        else:
            self.runs.flush()

    # -- chat (chat_mode.py) -------------------------------------------------------------------------------------------
    @property
    def chat_mode(self) -> bool:
        return self.pages.currentWidget() is self.chat

    def forget_base(self) -> None:
        """Outputs of the last base, and the demo's prompts for its adapters, are not this base's."""
        super().forget_base()
        if self.job is None or self.job.done:
            self.results.forget()
            if self._demo_prompts:  # one prompt per demo adapter: not this base's
                self._demo_prompts = False
                self.set_prompts([""])

    def set_chat_mode(self, on: bool) -> None:
        switched = (self.pages.currentWidget() is self.chat) != on
        self.pages.setCurrentWidget(self.chat if on else self.prompts_page)
        if on != self.modes.chat_btn.isChecked():
            self.modes.chat_btn.setChecked(on)
        if switched and self.message.kind != "error" and (self.job is None or self.job.done):
            self.show_message("")  # a line about the other mode ("press Run") is not this one's
        if on:
            self.chat.input.setFocus()
        self.update_buttons()

    @property
    def conversation(self) -> Conversation:
        return self.chat_control.conversation

    def new_chat(self) -> None:
        """Forget the conversation; the system prompt in the box applies to the new one."""
        self.chat_control.new_chat()

    def send_chat(self, text: str) -> Job | None:
        """One turn: every ticked variant answers ``text`` after its own history (core chat_turn, one job)."""
        return self.chat_control.send(text)

    # -- share (share.py) ----------------------------------------------------------------------------------------------
    def copy_markdown(self) -> Job | None:
        return self.share.copy_markdown()

    def save_report(self) -> None:
        self.share.save_report()

    def write_report(self, path: Path) -> Job | None:
        return self.share.write_report(path)

    # -- variants made here (adapter_edits.py, merged.py; the Merge tab previews through these) ------------------------
    def set_adapter_scale(self, adapter: str, scale: float) -> Job | None:
        """Run ``adapter`` at ``scale`` from now on; the last comparison runs again with it."""
        return self.adapter_edits.set_scale(adapter, scale)

    def add_combination_variant(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None:
        """Create a weighted combination of attached adapters on the session (a job), then tick it as a column."""
        return self.adapter_edits.add_combination(name, weights, combination_type, density)

    def add_merged_variant(self, path: str, against: Sequence[str] = ()) -> Job | None:
        """Load a merged model folder beside the session and tick it as a column (see :meth:`MergedFolders.add`)."""
        return self.merged_folders.add(path, against)
