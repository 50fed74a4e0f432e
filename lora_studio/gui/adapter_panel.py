"""Adapters on the loaded base: attach, switch, disable all, delete, unload; an inspector; a quick test box."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.adapters.compatibility import VocabularyMismatch
from lora_studio.core.adapters.inspection import AdapterInspection
from lora_studio.core.session import SessionState
from lora_studio.core.system.memory import MemorySampler, format_bytes, measure_release
from lora_studio.gui.adapter_inspector import AdapterInspector
from lora_studio.gui.jobs import Job, JobRunner
from lora_studio.gui.ops import unique_name
from lora_studio.gui.panel import Panel
from lora_studio.gui.session_model import SessionModel

if TYPE_CHECKING:
    from lora_studio.core.adapters.training_log import TrainingLog

BASE_ROW = "__base__"
ACTIVE_MARK = "●"


class AdapterPanel(Panel):
    released = Signal(object)  # core.system.memory.Reclaimed after delete/unload
    adapter_attached = Signal(str)  # folder path, for the Recent menu

    def __init__(
        self,
        runner: JobRunner,
        session_model: SessionModel,
        sampler: MemorySampler | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(runner, session_model, parent)
        self.sampler = sampler
        # name -> (inspection, loss log or its problem), read once per adapter
        self._inspections: dict[str, tuple[AdapterInspection, TrainingLog | str | None]] = {}
        # Asked when an adapter brings added tokens; replaceable in tests.
        self.confirm_resize = self._ask_resize

        self.attach_btn = QPushButton("Attach adapter folder…")
        self.attach_btn.clicked.connect(self.browse_attach)
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["", "Adapter", "Memory", "Folder"])
        self.tree.setRootIsDecorated(False)
        self.tree.setColumnWidth(0, 24)
        self.tree.setColumnWidth(1, 150)
        self.tree.setColumnWidth(2, 80)
        self.tree.itemSelectionChanged.connect(self._selection_changed)
        self.tree.itemDoubleClicked.connect(lambda *_: self.activate_selected())
        self.activate_btn = QPushButton("Activate")
        self.activate_btn.clicked.connect(self.activate_selected)
        self.disable_btn = QPushButton("Disable all (base)")
        self.disable_btn.clicked.connect(self.disable_all)
        self.delete_btn = QPushButton("Delete")
        self.delete_btn.clicked.connect(self.delete_selected)
        self.unload_btn = QPushButton("Unload all")
        self.unload_btn.clicked.connect(self.unload_all)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.runner.cancel_current)
        self.cancel_btn.setEnabled(False)
        buttons = QHBoxLayout()
        for b in (self.activate_btn, self.disable_btn, self.delete_btn, self.unload_btn):
            buttons.addWidget(b)
        buttons.addStretch(1)
        top = QHBoxLayout()
        top.addWidget(self.attach_btn)
        top.addStretch(1)
        top.addWidget(self.progress, 3)
        top.addWidget(self.cancel_btn)

        list_box = QWidget()
        list_layout = QVBoxLayout(list_box)
        list_layout.setContentsMargins(0, 0, 0, 0)
        list_layout.addLayout(top)
        list_layout.addWidget(self.tree, 1)
        list_layout.addLayout(buttons)
        list_layout.addWidget(self.message)

        self.inspector = AdapterInspector()

        # quick generate
        gen_box = QGroupBox("Try it (active adapter)")
        self.prompt_edit = QLineEdit()
        self.prompt_edit.setPlaceholderText("a prompt for the active adapter (or the base)…")
        self.prompt_edit.returnPressed.connect(self.generate)
        self.max_tokens = QSpinBox(minimum=1, maximum=4096, value=48)
        self.max_tokens.setToolTip("new tokens")
        self.generate_btn = QPushButton("Generate")
        self.generate_btn.clicked.connect(self.generate)
        row = QHBoxLayout()
        row.addWidget(self.prompt_edit, 1)
        row.addWidget(QLabel("tokens"))
        row.addWidget(self.max_tokens)
        row.addWidget(self.generate_btn)
        self.output = QPlainTextEdit(readOnly=True)
        self.output.setPlaceholderText("output appears here (greedy decoding)")
        self.output.setMaximumHeight(110)
        gen_layout = QVBoxLayout(gen_box)
        gen_layout.addLayout(row)
        gen_layout.addWidget(self.output)

        upper = QSplitter(Qt.Orientation.Horizontal)
        upper.addWidget(list_box)
        # scrolled: the filled-in inspector (eight fields, two charts) is taller than a laptop screen allows,
        # and unscrolled its minimum height made the whole window grow, and every chart re-lay out, mid-job
        inspector_scroll = QScrollArea()
        inspector_scroll.setWidgetResizable(True)
        inspector_scroll.setFrameShape(QFrame.Shape.NoFrame)
        inspector_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # the fields wrap instead
        inspector_scroll.setWidget(self.inspector)
        upper.addWidget(inspector_scroll)
        upper.setStretchFactor(0, 3)
        upper.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(upper, 1)
        layout.addWidget(gen_box)
        self.setAcceptDrops(False)  # the window handles drops
        self.show_state(self.state)

    @property
    def inspection(self) -> AdapterInspection | None:
        """The inspection the inspector shows (None when it shows none)."""
        return self.inspector.inspection

    def build_charts(self) -> None:
        self.inspector.build_charts()

    # -- state --------------------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        self.state = state
        selected = self.selected_name()
        self.tree.clear()
        if state.base:
            base = QTreeWidgetItem(["", "(base, adapters off)", "", state.base])
            base.setData(1, Qt.ItemDataRole.UserRole, BASE_ROW)
            base.setToolTip(1, "the base model's own behaviour")
            self.tree.addTopLevelItem(base)
            if state.active_adapter is None:
                self._mark(base)
            for name, path, size in state.adapters:
                item = QTreeWidgetItem(["", name, format_bytes(size), path])
                item.setData(1, Qt.ItemDataRole.UserRole, name)
                item.setToolTip(3, path)
                item.setToolTip(2, "memory its weights take in the loaded model")
                self.tree.addTopLevelItem(item)
                if name == state.active_adapter:
                    self._mark(item)
                if name == selected:
                    item.setSelected(True)
        self.update_buttons()
        names = {a[0] for a in state.adapters}
        if self.inspection is not None and self.inspection.name not in names:
            self.inspector.clear()

    def _mark(self, item: QTreeWidgetItem) -> None:
        item.setText(0, ACTIVE_MARK)
        item.setToolTip(0, "active")
        font = QFont(item.font(1))
        font.setBold(True)
        for col in range(4):
            item.setFont(col, font)

    def active_row(self) -> str | None:
        for i in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(i)
            if item.text(0) == ACTIVE_MARK:
                return item.data(1, Qt.ItemDataRole.UserRole)
        return None

    def selected_name(self) -> str | None:
        items = self.tree.selectedItems()
        return items[0].data(1, Qt.ItemDataRole.UserRole) if items else None

    def select(self, name: str) -> None:
        for i in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(i)
            if item.data(1, Qt.ItemDataRole.UserRole) == name:
                self.tree.setCurrentItem(item)
                return

    def update_buttons(self) -> None:
        busy = self.busy_reason
        loaded = bool(self.state.base)
        has = bool(self.state.adapters)
        sel = self.selected_name()
        self.set_reasons(
            {
                self.attach_btn: (
                    busy or ("" if loaded else "load a base model first"),
                    "Attach a PEFT LoRA adapter folder (adapter_config.json + weights)",
                ),
                self.activate_btn: (
                    busy or ("" if sel else "select an adapter in the list"),
                    "Make the selected adapter the active one",
                ),
                self.disable_btn: (
                    busy or ("" if has else "no adapters attached"),
                    "Base behaviour; adapters stay attached",
                ),
                self.delete_btn: (
                    busy or ("" if sel and sel != BASE_ROW else "select an adapter to delete"),
                    "Remove the selected adapter and free its memory",
                ),
                self.unload_btn: (
                    busy or ("" if has else "no adapters attached"),
                    "Remove every adapter; keep the base",
                ),
                self.generate_btn: (
                    busy or ("" if loaded else "load a base model first"),
                    "Generate with the active adapter",
                ),
            }
        )
        self.cancel_btn.setEnabled(self.runner.current is not None)

    # -- jobs ---------------------------------------------------------------------------------------------------------
    def _run(self, name: str, fn, on_done, *, marker: str | None = None) -> Job | None:
        """A model job of this panel; ``marker`` goes on the memory chart when it succeeds."""

        def done(result) -> None:
            on_done(result)
            if marker and not isinstance(result, Exception):  # a refusal handed back for a question marks nothing
                self.marker.emit(marker)

        return self.op(name, fn).on_success(done).run()

    def browse_attach(self) -> None:
        start = str(Path(self.state.adapters[-1][1]).parent) if self.state.adapters else str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose a LoRA adapter folder", start)
        if path:
            self.attach(path)

    def unique_name(self, path: str) -> str:
        """A free adapter name from a folder's name (PEFT names have no dots)."""
        stem = re.sub(r"[.\s]+", "-", Path(path).name.strip()) or "adapter"
        return unique_name(stem, (a[0] for a in self.state.adapters))

    def attach(self, path: str, name: str | None = None, *, resize_embeddings: bool = False) -> Job | None:
        name = name or self.unique_name(path)
        session = self.session

        def run(*, cancel, report):
            try:
                return session.attach(
                    Path(path), name, resize_embeddings=resize_embeddings, cancel=cancel, report=report
                )
            except VocabularyMismatch as mismatch:
                if (
                    resize_embeddings
                    or not mismatch.adapter_has_tokenizer
                    or mismatch.adapter_vocab < mismatch.base_vocab
                ):
                    raise
                return mismatch  # the GUI thread asks the user, then attaches again with resizing

        def done(attached) -> None:
            if isinstance(attached, VocabularyMismatch):
                self._offer_resize(path, name, attached)
                return
            text = f"attached {attached.name} ({format_bytes(attached.size_bytes)})"
            if attached.warnings:
                self.show_message(text + " — " + "; ".join(attached.warnings), "warn")
            else:
                self.show_message(text, "ok")
            self.adapter_attached.emit(str(path))

        job = self._run(f"attaching {name}", run, done, marker=f"attached {name}")
        if job is not None:
            self.show_message(f"attaching {name}…")
        return job

    def _offer_resize(self, path: str, name: str, mismatch: VocabularyMismatch) -> None:
        if self.confirm_resize(mismatch):
            self.attach(path, name, resize_embeddings=True)
        else:
            self.show_message(f"{mismatch.message} — not attached", "warn")

    def _ask_resize(self, mismatch: VocabularyMismatch) -> bool:
        from PySide6.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self,
            "Resize the vocabulary?",
            f"{mismatch.message}.\n\nThe adapter folder has its own tokenizer with the added tokens. Resize the base's "
            f"embeddings to {mismatch.adapter_vocab} tokens and use that tokenizer? (The files on disk are not changed; "
            "a merge saves the adapter's tokenizer with the model.)",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.Yes,
        )
        return answer == QMessageBox.StandardButton.Yes

    def activate_selected(self) -> None:
        name = self.selected_name()
        if name == BASE_ROW:
            self.disable_all()
        elif name:
            self.activate(name)

    def activate(self, name: str) -> Job | None:
        session = self.session
        return self._run(
            f"activating {name}",
            lambda *, cancel, report: session.activate(name),
            lambda _: self.show_message(f"{name} is active", "ok"),
        )

    def disable_all(self) -> Job | None:
        session = self.session
        return self._run(
            "disabling adapters",
            lambda *, cancel, report: session.disable_adapters(),
            lambda _: self.show_message("adapters off: the model behaves as the base", "ok"),
            marker="adapters off",
        )

    def _release_job(self, label: str, expected: int, release) -> Job | None:
        sampler = self.sampler
        on_gpu = str(self.state.device or "").startswith("cuda")

        def run(*, cancel, report):
            if sampler is None:
                release()
                return None
            return measure_release(sampler, release, label=label, expected_bytes=expected, on_gpu=on_gpu)[1]

        def done(reclaimed) -> None:
            if reclaimed is None:
                self.show_message(label, "ok")
                return
            self.show_message(reclaimed.message(), "warn" if reclaimed.leaked else "ok")
            self.released.emit(reclaimed)

        return self._run(label, run, done, marker=label)

    def delete_selected(self) -> Job | None:
        name = self.selected_name()
        if name and name != BASE_ROW:
            return self.delete(name)
        return None

    def delete(self, name: str) -> Job | None:
        size = next((a[2] for a in self.state.adapters if a[0] == name), 0)
        self._inspections.pop(name, None)
        session = self.session
        return self._release_job(f"deleted {name}", size, lambda: session.delete(name))

    def unload_all(self) -> Job | None:
        size = sum(a[2] for a in self.state.adapters)
        self._inspections.clear()
        session = self.session
        return self._release_job("unloaded all adapters", size, session.unload_all)

    def generate(self) -> Job | None:
        from lora_studio.core.generation.generate import GenerationSettings, generate

        prompt = self.prompt_edit.text()
        settings = GenerationSettings(max_new_tokens=self.max_tokens.value())
        session = self.session
        who = self.state.active_adapter or "base"

        def run(*, cancel, report):
            with session.lock:
                model = session.require_loaded()
                return generate(model, session.tokenizer, prompt, settings, cancel=cancel, report=report)

        def done(generated) -> None:
            self.output.setPlainText(generated.text)
            self.show_message(f"{who}: {len(generated.token_ids)} tokens", "ok")

        self.output.setPlainText("")
        return self._run(f"generating with {who}", run, done)

    # -- inspector (a keyed side job: selecting another adapter supersedes it) ---------------------------------------
    def _selection_changed(self) -> None:
        self.update_buttons()
        name = self.selected_name()
        if not name or name == BASE_ROW:
            return
        path = next((a[1] for a in self.state.adapters if a[0] == name), None)
        if path is None:
            return
        if name in self._inspections:
            self._show_inspected(*self._inspections[name])
            return
        from lora_studio.core.adapters.inspection import inspect_adapter
        from lora_studio.core.adapters.training_log import read_loss_log

        params = self.state.params

        def run(*, cancel, report):
            return inspect_adapter(Path(path), name=name, base_params=params), read_loss_log(Path(path))

        def done(result) -> None:
            self._inspections[name] = result
            if self.selected_name() == name:
                self._show_inspected(*result)

        self.op(f"inspecting {name}", run, exclusive=False, key="inspect", progress=False).on_success(done).on_failure(
            lambda desc: self.inspector.show_error(desc.message)
        ).on_cancel(lambda: None).run()

    def _show_inspected(self, inspection: AdapterInspection, loss: TrainingLog | str | None) -> None:
        self.inspector.show_inspection(inspection)
        self.inspector.show_loss(loss)
