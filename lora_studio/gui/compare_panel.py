"""The Compare tab: the same prompt through several variants side by side, streamed, with divergence marks.

Variants are the base (adapters off), every adapter on the session (weighted
combinations included: they are session adapters), and merged model folders
loaded read-only beside the session. One Run is one job on the window's runner
(core.comparison.compare); tokens arrive on the worker thread as TokenDelta
objects, are queued in a :class:`DeltaBuffer` and drawn by a ~30 Hz timer, so a
fast model never floods the event loop with one signal per token.

After a run every column is marked where it first differs from the reference
column, and a :class:`KLStrip` under it paints the teacher-forced per-token KL
against the reference continuation.

The GUI thread never calls into the model: merged models travel as opaque
references from the job that loaded them to the job that compares them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QEvent, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont, QPainter, QPen, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QFrame, QGroupBox,
                               QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPlainTextEdit, QPushButton,
                               QScrollArea, QSizePolicy, QSpinBox, QSplitter, QToolTip, QVBoxLayout, QWidget)

from lora_studio.core.errors import UserError, describe
from lora_studio.core.generation.generate import MAX_NEW_TOKENS_LIMIT, GenerationSettings, validate
from lora_studio.core.session import Session, SessionState
from lora_studio.gui.jobs import JobRunner
from lora_studio.gui.widgets import MessageLine, job_progress_bar, reset_progress, show_progress

FLUSH_INTERVAL_MS = 33  # ~30 redraws a second while tokens stream
KIND_BASE, KIND_ADAPTER, KIND_MERGED = "base", "adapter", "merged"
DIVERGED_BACKGROUND = "#fde2c4"  # from the first differing token onward
COLUMN_MIN_WIDTH = 180


# -- streaming ------------------------------------------------------------------------------------------------------

class DeltaBuffer:
    """TokenDeltas from the worker thread, drained by the GUI thread's timer. One per run, so a stale run is ignored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, str, int]] = []

    def push(self, delta) -> None:  # worker thread
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

    result: object  # core.comparison.ComparisonResult (one prompt)
    reference_pieces: list[str]  # the reference continuation, one printable piece per token (tooltips)
    divergence_offsets: dict[str, Optional[int]] = field(default_factory=dict)  # char offset of the first differing token


def _run_comparison(session, variants, prompt: str, settings: GenerationSettings, reference: Optional[str],
                    buffer: DeltaBuffer, *, cancel, report) -> RunOutcome:
    """The job (worker thread): core compare, then token pieces and character offsets for the marks."""
    from lora_studio.core.compare.runs import compare

    result = compare(session, variants, [prompt], settings, reference=reference, cancel=cancel, report=report,
                     on_tokens=buffer.push)
    cmp = result.prompts[0]
    with session.lock:
        tokenizer = session.tokenizer
        ref_ids = cmp.output(cmp.divergence.reference).token_ids
        pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ref_ids]
        offsets: dict[str, Optional[int]] = {}
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


# -- the KL heat strip ------------------------------------------------------------------------------------------------

def kl_color(kl: float) -> QColor:
    """Pale for agreement, deep red for large KL; 1 - exp(-kl) keeps small differences visible."""
    t = 1.0 - math.exp(-max(0.0, kl))
    low, high = (238, 242, 246), (200, 30, 30)
    return QColor(*(int(a + (b - a) * t) for a, b in zip(low, high)))


class KLStrip(QWidget):
    """One cell per reference token, coloured by KL(reference ‖ this column); tooltip per token."""

    HEIGHT = 16

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setFixedHeight(self.HEIGHT)
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.kl: list[float] = []
        self.logprobs: list[float] = []
        self.agrees: list[bool] = []
        self.pieces: list[str] = []
        self.first_divergence: Optional[int] = None
        self.setToolTip("teacher-forced KL against the reference, per token (after a run)")

    def set_scores(self, scores, pieces: list[str], first_divergence: Optional[int]) -> None:
        self.kl = list(scores.kl) if scores else []
        self.logprobs = list(scores.logprobs) if scores else []
        self.agrees = list(scores.agrees) if scores else []
        self.pieces = list(pieces)
        self.first_divergence = first_divergence
        self.setToolTip("" if self.kl else "no tokens to score")
        self.update()

    def clear(self) -> None:
        self.set_scores(None, [], None)
        self.setToolTip("teacher-forced KL against the reference, per token (after a run)")

    def index_at(self, x: float) -> Optional[int]:
        if not self.kl or self.width() <= 0:
            return None
        return min(len(self.kl) - 1, max(0, int(x * len(self.kl) / self.width())))

    def tooltip_for(self, i: int) -> str:
        piece = self.pieces[i] if i < len(self.pieces) else ""
        agree = "its greedy choice agrees" if self.agrees[i] else "its greedy choice differs"
        return (f"token {i} {piece!r}\nlog p = {self.logprobs[i]:.3f}\nKL = {self.kl[i]:.4f} nats\n{agree}")

    def event(self, event) -> bool:
        if event.type() == QEvent.ToolTip and self.kl:
            i = self.index_at(event.position().x() if hasattr(event, "position") else event.pos().x())
            if i is not None:
                QToolTip.showText(event.globalPos(), self.tooltip_for(i), self)
                return True
        return super().event(event)

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        rect = self.rect()
        painter.fillRect(rect, QColor("#f7f7f7"))
        n = len(self.kl)
        if n:
            width = rect.width() / n
            for i, kl in enumerate(self.kl):
                painter.fillRect(QRectF(i * width, 0, width + 0.5, rect.height()), kl_color(kl))
            if self.first_divergence is not None and self.first_divergence < n:
                painter.setPen(QPen(QColor("#222222"), 2))
                x = int(self.first_divergence * width)
                painter.drawLine(x, 0, x, rect.height())
        painter.setPen(QColor("#c8c8c8"))
        painter.drawRect(rect.adjusted(0, 0, -1, -1))
        painter.end()


# -- one column -------------------------------------------------------------------------------------------------------

class ColumnView(QFrame):
    """Header (name, summary numbers), the streamed text, the KL strip."""

    def __init__(self, name: str, kind: str, parent=None) -> None:
        super().__init__(parent)
        self.name, self.kind = name, kind
        self.setFrameShape(QFrame.StyledPanel)
        self.setMinimumWidth(COLUMN_MIN_WIDTH)
        self.header = QLabel()
        self.header.setTextFormat(Qt.RichText)
        self.header.setWordWrap(True)
        self.header.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.text = QPlainTextEdit(readOnly=True)
        self.text.setPlaceholderText("press Run")
        font = QFont(self.text.font())
        font.setPointSizeF(max(10.0, font.pointSizeF()))
        self.text.setFont(font)
        self.strip = KLStrip()
        self.strip_label = QLabel("KL vs reference, per token")
        self.strip_label.setStyleSheet("color: palette(mid); font-size: 8pt;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(4)
        layout.addWidget(self.header)
        layout.addWidget(self.text, 1)
        layout.addWidget(self.strip)
        layout.addWidget(self.strip_label)
        self.tokens = 0
        self.streamed = ""  # exactly what arrived from the stream (the final text replaces it only if they differ)
        self.first_divergence: Optional[int] = None
        self.scores = None
        self.set_header()

    def set_header(self, detail: str = "") -> None:
        kinds = {KIND_BASE: "adapters off", KIND_ADAPTER: "adapter", KIND_MERGED: "merged folder"}
        line = f"<b>{_html(self.name)}</b> <span style='color:gray'>({kinds.get(self.kind, self.kind)})</span>"
        self.header.setText(line + (f"<br>{detail}" if detail else ""))

    def reset(self) -> None:
        self.text.clear()
        self.tokens, self.streamed = 0, ""
        self.first_divergence, self.scores = None, None
        self.strip.clear()
        self.set_header()

    def append(self, text: str, tokens: int) -> None:
        self.tokens += tokens
        self.streamed += text
        if text:
            bar = self.text.verticalScrollBar()
            at_end = bar.value() >= bar.maximum() - 2
            cursor = QTextCursor(self.text.document())
            cursor.movePosition(QTextCursor.End)
            cursor.insertText(display_text(text))
            if at_end:
                bar.setValue(bar.maximum())
        self.set_header(f"<span style='color:gray'>{self.tokens} tokens…</span>")

    def finish(self, output, column, reference: str, pieces: list[str], offset: Optional[int]) -> None:
        """Final text, the divergence mark, the strip and the summary in the header."""
        shown = display_text(output.text)
        if self.text.toPlainText() != shown:
            self.text.setPlainText(shown)
        self.tokens = len(output.token_ids)
        self.first_divergence = column.first_divergence
        self.scores = column.scores
        if offset is not None and offset < len(shown):
            fmt = QTextCharFormat()
            fmt.setBackground(QColor(DIVERGED_BACKGROUND))
            cursor = QTextCursor(self.text.document())
            cursor.setPosition(offset)
            cursor.movePosition(QTextCursor.End, QTextCursor.KeepAnchor)
            cursor.mergeCharFormat(fmt)
        self.strip.set_scores(column.scores, pieces, column.first_divergence)
        parts = [f"{self.tokens} tokens"]
        if self.name == reference:
            parts.append("<i>reference</i>")
        elif column.first_divergence is None:
            parts.append("identical to the reference")
        else:
            parts.append(f"differs from token {column.first_divergence}")
        if column.scores is not None and self.name != reference:
            parts.append(f"mean KL {column.scores.mean_kl:.3f}")
            parts.append(f"agreement {column.scores.agreement:.0f} %")
        self.set_header(" · ".join(parts))
        self.setToolTip("" if self.name == reference else
                        "highlighted: from the first token that differs from the reference;\n"
                        "strip: how surprised this variant is by the reference's tokens (KL, nats)")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- the panel --------------------------------------------------------------------------------------------------------

class ComparePanel(QWidget):
    state_changed = Signal(object)  # SessionState after this panel changed the session (a combination added)
    run_finished = Signal(object)  # RunOutcome

    def __init__(self, runner: JobRunner, session: Session, parent=None) -> None:
        super().__init__(parent)
        self.runner, self.session = runner, session
        self.state: Optional[SessionState] = None
        self.merged: dict[str, object] = {}  # column name -> BesideModel (opaque here)
        self.merged_paths: dict[str, str] = {}
        self.unticked: set[str] = set()  # remembered across list refreshes; new variants start ticked
        self.prompts: list[str] = []
        self.columns: list[ColumnView] = []
        self.job = None
        self.outcome: Optional[RunOutcome] = None
        self._buffer = DeltaBuffer()
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(FLUSH_INTERVAL_MS)
        self._flush_timer.timeout.connect(self.flush)
        self._has_chat_template: Optional[bool] = None

        # variants
        self.variant_list = QListWidget()
        self.variant_list.setToolTip("ticked variants become columns")
        self.variant_list.itemChanged.connect(self._ticks_changed)
        self.variant_list.currentItemChanged.connect(lambda *_: self._update_buttons())
        self.add_merged_btn = QPushButton("Add merged model folder…")
        self.add_merged_btn.clicked.connect(self.browse_merged)
        self.remove_btn = QPushButton("Remove")
        self.remove_btn.clicked.connect(self.remove_selected_merged)
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("divergence and KL are measured against this column (applies to the next run)")
        variants_box = QGroupBox("Variants")
        vlay = QVBoxLayout(variants_box)
        vlay.addWidget(self.variant_list, 1)
        row = QHBoxLayout()
        row.addWidget(self.add_merged_btn, 1)
        row.addWidget(self.remove_btn)
        vlay.addLayout(row)
        ref_row = QHBoxLayout()
        ref_row.addWidget(QLabel("Reference"))
        ref_row.addWidget(self.reference_combo, 1)
        vlay.addLayout(ref_row)

        # decoding
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["greedy", "sampling"])
        self.mode_combo.setToolTip("greedy is deterministic; sampling seeds every column with the same seed")
        self.mode_combo.currentIndexChanged.connect(lambda *_: self._update_decoding())
        self.temperature = QDoubleSpinBox(minimum=0.01, maximum=5.0, singleStep=0.05, value=0.7, decimals=2)
        self.top_p = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, value=0.95, decimals=2)
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.max_tokens = QSpinBox(minimum=1, maximum=MAX_NEW_TOKENS_LIMIT, value=64)
        decoding_box = QGroupBox("Decoding (same for every column)")
        form = QFormLayout(decoding_box)
        form.addRow("mode", self.mode_combo)
        form.addRow("temperature", self.temperature)
        form.addRow("top-p", self.top_p)
        form.addRow("seed", self.seed)
        form.addRow("max new tokens", self.max_tokens)

        side = QWidget()
        slay = QVBoxLayout(side)
        slay.setContentsMargins(0, 0, 0, 0)
        slay.addWidget(variants_box, 1)
        slay.addWidget(decoding_box)
        legend = QLabel("<b>Reading the columns</b><br>"
                        f"<span style='background:{DIVERGED_BACKGROUND}'>&nbsp;highlighted&nbsp;</span> from the first token "
                        "that differs from the reference column.<br>"
                        "The strip under each column: KL(reference ‖ column) per reference token, pale = same "
                        "distribution, red = far apart; hover a cell for the token, its log-probability and KL. "
                        "The black tick marks the first divergence.")
        legend.setWordWrap(True)
        legend.setStyleSheet("color: palette(dark); font-size: 9pt;")
        slay.addWidget(legend)

        # prompt
        self.prompt_edit = QPlainTextEdit()
        self.prompt_edit.setPlaceholderText("a prompt to send to every ticked variant…")
        self.prompt_edit.setFixedHeight(72)
        self.prompt_select = QComboBox()
        self.prompt_select.setToolTip("prompts from the loaded file; the chosen one goes into the box")
        self.prompt_select.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.prompt_select.setMinimumContentsLength(30)
        self.prompt_select.currentIndexChanged.connect(self._prompt_picked)
        self.prompt_select.hide()
        self.load_prompts_btn = QPushButton("Load prompts…")
        self.load_prompts_btn.setToolTip("a .txt file (one prompt per line) or .jsonl ({\"prompt\": ...} per line)")
        self.load_prompts_btn.clicked.connect(self.browse_prompts)
        self.chat_check = QCheckBox("chat template")
        self.chat_check.setChecked(True)
        self.chat_check.setToolTip("wrap the prompt in the tokenizer's chat template; off: the text is fed as is")
        prompt_top = QHBoxLayout()
        prompt_top.addWidget(QLabel("Prompt"))
        prompt_top.addWidget(self.prompt_select, 1)
        prompt_top.addStretch(0)
        prompt_top.addWidget(self.load_prompts_btn)
        prompt_top.addWidget(self.chat_check)

        # run bar
        self.run_btn = QPushButton("Run")
        self.run_btn.setDefault(True)
        self.run_btn.clicked.connect(self.run)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.clicked.connect(self.stop)
        self.progress = job_progress_bar()
        self.note = QLabel("")
        self.note.setStyleSheet("color: palette(mid);")
        self.note.setTextInteractionFlags(Qt.TextSelectableByMouse)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_btn)
        run_row.addWidget(self.stop_btn)
        run_row.addWidget(self.progress, 1)
        run_row.addWidget(self.note, 2)
        self.message = MessageLine()

        # columns
        self.column_splitter = QSplitter(Qt.Horizontal)
        self.column_splitter.setChildrenCollapsible(False)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.NoFrame)
        self.scroll.setWidget(self.column_splitter)
        self.empty_label = QLabel("Tick variants on the left; each becomes a column here.")
        self.empty_label.setAlignment(Qt.AlignCenter)
        self.empty_label.setStyleSheet("color: palette(mid);")

        main = QWidget()
        mlay = QVBoxLayout(main)
        mlay.setContentsMargins(0, 0, 0, 0)
        mlay.addLayout(prompt_top)
        mlay.addWidget(self.prompt_edit)
        mlay.addLayout(run_row)
        mlay.addWidget(self.message)
        mlay.addWidget(self.empty_label)
        mlay.addWidget(self.scroll, 1)

        splitter = QSplitter(Qt.Horizontal)
        splitter.addWidget(side)
        splitter.addWidget(main)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([250, 1000])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(splitter)

        runner.busy_changed.connect(self._busy_changed)
        self._update_decoding()
        self.show_state(None)

    # -- state ------------------------------------------------------------------------------------------------------
    def show_state(self, state: Optional[SessionState]) -> None:
        """Refresh the variant list from a session snapshot (never reads the session itself while a job may hold it)."""
        previous = self.state
        self.state = state
        base_gone = state is None or not state.base
        base_changed = previous is not None and state is not None and previous.base_path != state.base_path
        if base_gone or base_changed:
            self._drop_merged()  # loaded beside another base: no longer comparable
        if state is not None and state.base and (previous is None or previous.base_path != state.base_path):
            # An attribute read, no model call: the toggle's default follows the tokenizer.
            template = getattr(self.session.tokenizer, "chat_template", None)
            self._has_chat_template = bool(template)
            self.chat_check.setChecked(self._has_chat_template)
            self.chat_check.setText("chat template" if template else "chat template (none: raw text)")
            self.chat_check.setEnabled(bool(template))
        self._fill_variants()

    def base_name(self) -> str:
        adapters = {a[0] for a in self.state.adapters} if self.state else set()
        return "base" if "base" not in adapters else "base (adapters off)"

    def available_variants(self) -> list[tuple[str, str]]:
        """(name, kind) of every variant that can be ticked, in display order."""
        if not self.state or not self.state.base:
            return []
        out = [(self.base_name(), KIND_BASE)]
        out += [(name, KIND_ADAPTER) for name, _path, _size in self.state.adapters]
        out += [(name, KIND_MERGED) for name in self.merged]
        return out

    def _fill_variants(self) -> None:
        paths = {name: path for name, path, _ in (self.state.adapters if self.state else ())}
        self.variant_list.blockSignals(True)
        current = self.variant_list.currentItem().data(Qt.UserRole) if self.variant_list.currentItem() else None
        self.variant_list.clear()
        for name, kind in self.available_variants():
            label = {KIND_BASE: f"{name}", KIND_ADAPTER: name, KIND_MERGED: f"{name} (merged folder)"}[kind]
            item = QListWidgetItem(label)
            item.setData(Qt.UserRole, (name, kind))
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Unchecked if name in self.unticked else Qt.Checked)
            tip = {KIND_BASE: "the base model with every adapter disabled",
                   KIND_ADAPTER: paths.get(name, ""),
                   KIND_MERGED: f"{self.merged_paths.get(name, '')}\nloaded read-only beside the session"}[kind]
            item.setToolTip(tip)
            self.variant_list.addItem(item)
            if (name, kind) == current:
                self.variant_list.setCurrentItem(item)
        self.variant_list.blockSignals(False)
        self._ticks_changed()

    def ticked(self) -> list[tuple[str, str]]:
        out = []
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            if item.checkState() == Qt.Checked:
                out.append(tuple(item.data(Qt.UserRole)))
        return out

    def set_ticked(self, names) -> None:
        """Tick exactly ``names`` (and untick the rest)."""
        names = set(names)
        self.variant_list.blockSignals(True)
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            name = item.data(Qt.UserRole)[0]
            item.setCheckState(Qt.Checked if name in names else Qt.Unchecked)
        self.variant_list.blockSignals(False)
        self._ticks_changed()

    def _ticks_changed(self, *_args) -> None:
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            name = item.data(Qt.UserRole)[0]
            if item.checkState() == Qt.Checked:
                self.unticked.discard(name)
            else:
                self.unticked.add(name)
        ticked = [name for name, _ in self.ticked()]
        chosen = self.reference_combo.currentText()
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItems(ticked)
        default = self.base_name() if self.base_name() in ticked else (ticked[0] if ticked else "")
        self.reference_combo.setCurrentText(chosen if chosen in ticked else default)
        self.reference_combo.blockSignals(False)
        if self.job is None:
            self._build_columns(self.ticked())
        self._update_buttons()

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
        self.scroll.setVisible(bool(self.columns))

    def column(self, name: str) -> ColumnView:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def _update_decoding(self) -> None:
        sampling = self.mode_combo.currentText() == "sampling"
        for w in (self.temperature, self.top_p, self.seed):
            w.setEnabled(sampling)

    def _busy_changed(self, _reason: str) -> None:
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = self.runner.busy_reason
        loaded = bool(self.state and self.state.base)
        running = self.job is not None
        reason = busy or ("" if loaded else "load a base model first")
        self.run_btn.setEnabled(not reason)
        self.run_btn.setToolTip(reason or "run the prompt through every ticked variant")
        self.stop_btn.setEnabled(running)
        self.stop_btn.setToolTip("stop the comparison within one decoding step" if running else "nothing is running")
        self.add_merged_btn.setEnabled(not reason)
        self.add_merged_btn.setToolTip(reason or "load a merged model folder read-only beside the session, as a column")
        item = self.variant_list.currentItem()
        removable = bool(item and item.data(Qt.UserRole)[1] == KIND_MERGED) and not running
        self.remove_btn.setEnabled(removable)
        self.remove_btn.setToolTip("unload the selected merged folder" if removable
                                   else "select a merged folder to unload it (delete adapters in the Adapters tab)")

    def settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_tokens.value(), do_sample=self.mode_combo.currentText() == "sampling",
                                  temperature=self.temperature.value(), top_p=self.top_p.value(), seed=self.seed.value(),
                                  use_chat_template=self.chat_check.isChecked())

    # -- prompts ----------------------------------------------------------------------------------------------------
    def set_prompts(self, prompts: list[str], labels: Optional[list[str]] = None) -> None:
        """Fill the prompt selector; the first prompt goes into the box."""
        self.prompts = list(prompts)
        self.prompt_select.blockSignals(True)
        self.prompt_select.clear()
        for i, prompt in enumerate(self.prompts):
            label = labels[i] if labels else prompt
            label = " ".join(label.split())
            self.prompt_select.addItem(label if len(label) <= 80 else label[:79] + "…")
            self.prompt_select.setItemData(i, prompt, Qt.ToolTipRole)
        self.prompt_select.blockSignals(False)
        self.prompt_select.setVisible(bool(self.prompts))
        if self.prompts:
            self.prompt_select.setCurrentIndex(0)
            self._prompt_picked(0)

    def _prompt_picked(self, index: int) -> None:
        if 0 <= index < len(self.prompts):
            self.prompt_edit.setPlainText(self.prompts[index])

    def browse_prompts(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load prompts", str(Path.home()),
                                              "Prompt lists (*.txt *.jsonl *.ndjson);;All files (*)")
        if path:
            self.load_prompts_file(path)

    def load_prompts_file(self, path: str):
        """Read a .txt/.jsonl prompt list off the GUI thread (a side job: it does not touch the model)."""
        from lora_studio.core.generation.prompts import load_prompts

        def done(prompts):
            self.set_prompts(prompts)
            self.message.show_message(f"{len(prompts)} prompts from {Path(path).name}", "ok")

        return self.runner.submit(f"reading {Path(path).name}", lambda *, cancel, report: load_prompts(path),
                                  exclusive=False, key="compare-prompts", on_done=done,
                                  on_error=lambda d: self.message.show_message(d.message, "error"))

    def prefill_demo(self) -> None:
        """--demo: each demo adapter's prompt in the selector (first selected), base and demo adapters ticked."""
        from lora_studio.core.demo import assets as demo_assets

        try:
            prompts = demo_assets.demo_prompts()
        except UserError as exc:
            self.message.show_message(str(exc), "warn")
            return
        attached = {a[0] for a in (self.state.adapters if self.state else ())}
        chosen = {name: p for name, p in prompts.items() if name in attached} or prompts
        self.set_prompts(list(chosen.values()), [f"{name}: {p}" for name, p in chosen.items()])
        self.set_ticked([self.base_name(), *[name for name in chosen if name in attached]])
        self.message.show_message("demo: one prompt per adapter is ready; press Run to compare them", "ok")

    # -- run --------------------------------------------------------------------------------------------------------
    def _variants(self, ticked: list[tuple[str, str]]):
        from lora_studio.core.compare.runs import Variant

        out = []
        for name, kind in ticked:
            if kind == KIND_BASE:
                out.append(Variant.base(name))
            elif kind == KIND_ADAPTER:
                out.append(Variant.of_adapter(name))
            else:
                out.append(Variant.merged(self.merged[name], name))
        return out

    def run(self):
        """Start the comparison job; returns the Job, or None after saying why in the message line."""
        prompt = self.prompt_edit.toPlainText()
        settings = self.settings()
        ticked = self.ticked()
        try:
            if not self.state or not self.state.base:
                raise UserError("load a base model first", "pick one on the left")
            if not ticked:
                raise UserError("no variants are ticked", "tick at least one variant")
            validate(settings, prompt)
        except UserError as exc:
            self.message.show_message(str(exc), "error")
            return None
        reference = self.reference_combo.currentText() or None
        variants = self._variants(ticked)
        buffer = DeltaBuffer()
        session = self.session

        def fn(*, cancel, report):
            return _run_comparison(session, variants, prompt, settings, reference, buffer, cancel=cancel, report=report)

        try:
            job = self.runner.submit(f"comparing {len(variants)} variants", fn, on_done=self._done, on_error=self._failed,
                                     on_cancel=self._cancelled, on_progress=lambda p: show_progress(self.progress, p))
        except UserError as exc:  # Busy
            self.message.show_message(str(exc), "error")
            return None
        self._buffer = buffer
        self.job = job
        self.outcome = None
        self._build_columns(ticked)
        for column in self.columns:
            column.text.setPlaceholderText("waiting for the first token…")
        self.progress.show()
        self.progress.setRange(0, 0)
        mode = "greedy" if not settings.do_sample else f"sampling T={settings.temperature:g} top-p={settings.top_p:g} seed={settings.seed}"
        self.note.setText(f"{mode}, up to {settings.max_new_tokens} new tokens")
        self.message.show_message(f"comparing {len(variants)} variants…")
        self._flush_timer.start()
        self._update_buttons()
        return job

    def stop(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.stop_btn.setEnabled(False)
            self.message.show_message("stopping…", "warn")

    def flush(self) -> None:
        """Draw what the worker streamed since the last tick (the timer's slot)."""
        for variant, (text, tokens) in self._buffer.drain().items():
            try:
                self.column(variant).append(text, tokens)
            except KeyError:
                pass

    def _end_run(self) -> None:
        self._flush_timer.stop()
        self.flush()
        self.job = None
        reset_progress(self.progress)
        self.progress.hide()
        for column in self.columns:
            column.text.setPlaceholderText("")
        self._update_buttons()

    def _done(self, outcome: RunOutcome) -> None:
        self._end_run()
        self.outcome = outcome
        result = outcome.result
        cmp = result.prompts[0]
        report = cmp.divergence
        for column in self.columns:
            try:
                output = cmp.output(column.name)
            except KeyError:
                continue
            column.finish(output, report.column(column.name), report.reference, outcome.reference_pieces,
                          outcome.divergence_offsets.get(column.name))
        how = "one mixed batch" if result.mixed_batch else f"sequential: {result.fallback_reason}"
        merged = sum(1 for c in self.columns if c.kind == KIND_MERGED)
        if merged and result.mixed_batch:
            how += f" (+{merged} merged folder{'s' if merged > 1 else ''} on its own)"
        self.note.setText(f"{how} · {result.seconds:.1f} s · prompt {cmp.prompt_token_count} tokens")
        self.note.setToolTip(self.note.text())
        self.message.show_message(f"compared {len(cmp.outputs)} variants against {report.reference}", "ok")
        self.run_finished.emit(outcome)

    def _failed(self, desc) -> None:
        self._end_run()
        self.message.show_message(desc.message, "error")

    def _cancelled(self) -> None:
        self._end_run()
        self.note.setText(f"stopped after {max((c.tokens for c in self.columns), default=0)} tokens per column")
        self.message.show_message("comparison stopped", "warn")

    # -- variants made here -------------------------------------------------------------------------------------------
    def _submit(self, name: str, fn, on_done):
        def failed(desc):
            self.message.show_message(desc.message, "error")
            self._update_buttons()

        try:
            job = self.runner.submit(name, fn, on_done=on_done, on_error=failed,
                                     on_cancel=lambda: self.message.show_message(f"{name}: cancelled", "warn"))
        except Exception as exc:  # Busy: say it here
            self.message.show_message(describe(exc).message, "error")
            return None
        self.message.show_message(f"{name}…")
        self._update_buttons()
        return job

    def add_combination_variant(self, name: str, weights: dict[str, float], combination_type: str = "linear",
                                density: Optional[float] = None):
        """Create a weighted combination of attached adapters on the session (a job), then tick it as a column."""
        from lora_studio.core.compare.runs import add_combination

        session = self.session
        weights = dict(weights)

        def fn(*, cancel, report):
            add_combination(session, name, weights, combination_type, density)
            return session.state()

        def done(state):
            self.unticked.discard(name)
            self.show_state(state)
            self.state_changed.emit(state)
            label = " + ".join(f"{a}×{w:g}" for a, w in weights.items())
            self.message.show_message(f"{name} = {combination_type}({label}) is ready to compare", "ok")

        return self._submit(f"combining into {name}", fn, done)

    def browse_merged(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a merged model folder", str(Path.home()))
        if path:
            self.add_merged_variant(path)

    def add_merged_variant(self, path: str):
        """Load a merged model folder read-only beside the session (a job), then tick it as a column."""
        from lora_studio.core.compare.runs import load_beside

        session = self.session
        taken = {name for name, _ in self.available_variants()}
        stem = Path(path).name or "merged"
        name, n = stem, 2
        while name in taken:
            name, n = f"{stem}-{n}", n + 1

        def fn(*, cancel, report):
            return load_beside(path, session, cancel=cancel, report=report)

        def done(beside):
            self.merged[name] = beside
            self.merged_paths[name] = str(path)
            self.unticked.discard(name)
            self._fill_variants()
            self.message.show_message(f"{name}: merged folder loaded beside the base, ready to compare", "ok")

        return self._submit(f"loading {stem} beside the base", fn, done)

    def remove_selected_merged(self) -> None:
        item = self.variant_list.currentItem()
        if item is None or item.data(Qt.UserRole)[1] != KIND_MERGED:
            return
        name = item.data(Qt.UserRole)[0]
        self._drop_merged([name])
        self._fill_variants()
        self.message.show_message(f"unloaded {name}", "ok")

    def _drop_merged(self, names=None) -> None:
        names = list(self.merged) if names is None else names
        held = [self.merged.pop(n) for n in names if n in self.merged]
        for n in names:
            self.merged_paths.pop(n, None)
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
