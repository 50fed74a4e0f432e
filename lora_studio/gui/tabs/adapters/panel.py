"""Adapters on the loaded base: attach, switch, disable all, detach, unload; an inspector; a Try it box (try_it.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QPushButton,
    QScrollArea,
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
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.ops import PanelOp, SessionJob, unique_name
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.tabs.adapters.inspector import AdapterInspector
from lora_studio.gui.tabs.adapters.questions import ask_resize, ask_unload
from lora_studio.gui.tabs.adapters.try_it import TryItBox

if TYPE_CHECKING:
    from lora_studio.core.adapters.training_log import TrainingLog
    from lora_studio.core.session import AttachedAdapter, Session
    from lora_studio.core.system.memory import Reclaimed
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.context import TabContext

BASE_ROW = "__base__"
ACTIVE_MARK = "●"
DETACH_TIP = "Detach the selected adapter from the model and free its memory; its files on disk are untouched"


T = TypeVar("T")
# an adapter read once: its inspection, and its loss log (or why there is none)
Inspected = tuple[AdapterInspection, "TrainingLog | str | None"]


class AdapterPanel(Panel):
    released = Signal(object)  # core.system.memory.Reclaimed after detach/unload
    adapter_attached = Signal(str)  # folder path, for the Recent menu

    def __init__(self, ctx: TabContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.sampler: MemorySampler | None = ctx.sampler
        # name -> (inspection, loss log or its problem), read once per adapter
        self._inspections: dict[str, Inspected] = {}
        # Asked when an adapter brings added tokens, and before Unload all; replaceable in tests and the soak.
        self.confirm_resize: Callable[[VocabularyMismatch], bool] = lambda mismatch: ask_resize(self, mismatch)
        self.confirm_unload: Callable[[Sequence[str]], bool] = lambda names: ask_unload(self, names)
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
        self.detach_btn = QPushButton("Detach")
        self.detach_btn.clicked.connect(self.detach_selected)
        self.unload_btn = QPushButton("Unload all…")
        self.unload_btn.clicked.connect(self.unload_all)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.runner.cancel_current)
        self.cancel_btn.setEnabled(False)
        buttons = QHBoxLayout()
        for b in (self.activate_btn, self.disable_btn, self.detach_btn, self.unload_btn):
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

        self.try_it = TryItBox(self)

        # The list column (list, buttons, message, Try it) spans the tab's height beside the inspector, so the
        # inspector shows its fields and the ‖ΔW‖ chart together even at 1280x720.
        left = QSplitter(Qt.Orientation.Vertical)
        left.setChildrenCollapsible(False)
        left.addWidget(list_box)
        left.addWidget(self.try_it)
        left.setStretchFactor(0, 1)
        left.setStretchFactor(1, 1)
        upper = QSplitter(Qt.Orientation.Horizontal)
        upper.setChildrenCollapsible(False)
        upper.addWidget(left)
        # scrolled: the filled-in inspector (nine fields, two charts) may be taller than a laptop screen allows,
        # and unscrolled its minimum height made the whole window grow, and every chart re-lay out, mid-job
        inspector_scroll = QScrollArea()
        inspector_scroll.setWidgetResizable(True)
        inspector_scroll.setFrameShape(QFrame.Shape.NoFrame)
        inspector_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # the fields wrap instead
        inspector_scroll.setWidget(self.inspector)
        upper.addWidget(inspector_scroll)
        upper.setStretchFactor(0, 3)
        upper.setStretchFactor(1, 2)
        upper.setSizes([600, 400])  # the inspector ~40 %: its fields wrap less, so the chart shows below them
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(upper, 1)
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
            if item is not None and item.text(0) == ACTIVE_MARK:
                return item.data(1, Qt.ItemDataRole.UserRole)
        return None

    def selected_name(self) -> str | None:
        items = self.tree.selectedItems()
        return items[0].data(1, Qt.ItemDataRole.UserRole) if items else None

    def select(self, name: str) -> None:
        for i in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(i)
            if item is not None and item.data(1, Qt.ItemDataRole.UserRole) == name:
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
                self.detach_btn: (
                    busy or ("" if sel and sel != BASE_ROW else "select an adapter to detach"),
                    DETACH_TIP,
                ),
                self.unload_btn: (
                    busy or ("" if has else "no adapters attached"),
                    "Detach every adapter (asks first); keep the base. The files on disk are untouched",
                ),
            }
        )
        self.cancel_btn.setEnabled(self.runner.current is not None)
        self.try_it.update_buttons(busy or ("" if loaded else "load a base model first"))

    # -- jobs ---------------------------------------------------------------------------------------------------------
    def _run(
        self,
        name: str,
        fn: SessionJob[T],
        on_done: Callable[[T], None],
        *,
        marker: str | None = None,
        refusal: Callable[[PanelOp[T]], PanelOp[T]] = lambda op: op,
    ) -> Job | None:
        """A model job of this panel; ``marker`` goes on the memory chart when it succeeds (a refusal marks
        nothing); ``refusal`` adds the op's refusal route, if it has one."""

        def done(result: T) -> None:
            on_done(result)
            if marker:
                self.marker.emit(marker)

        return refusal(self.op(name, fn).on_success(done)).run()

    def browse_attach(self) -> None:
        beside_last = str(Path(self.state.adapters[-1][1]).parent) if self.state.adapters else ""
        start = self.start_folder("adapter", beside_last)
        path = QFileDialog.getExistingDirectory(self, "Choose a LoRA adapter folder", start)
        if path:
            self.remember_folder("adapter", path)
            self.attach(path)

    def unique_name(self, path: str) -> str:
        """A free adapter name from a folder's name (PEFT names have no dots)."""
        stem = re.sub(r"[.\s]+", "-", Path(path).name.strip()) or "adapter"
        return unique_name(stem, (a[0] for a in self.state.adapters))

    def attach(self, path: str, name: str | None = None, *, resize_embeddings: bool = False) -> Job | None:
        name = name or self.unique_name(path)

        def run(session: Session, *, cancel: CancelToken, report: Report) -> AttachedAdapter:
            return session.attach(Path(path), name, resize_embeddings=resize_embeddings, cancel=cancel, report=report)

        def resizable(mismatch: VocabularyMismatch) -> bool:
            """A mismatch the user may fix by resizing: the GUI thread asks, then attaches again with resizing."""
            return (
                not resize_embeddings
                and mismatch.adapter_has_tokenizer
                and mismatch.adapter_vocab >= mismatch.base_vocab
            )

        def done(attached: AttachedAdapter) -> None:
            text = f"attached {attached.name} ({format_bytes(attached.size_bytes)})"
            said = "; ".join([*attached.notes, *attached.warnings])
            self.show_message(text + (f" — {said}" if said else ""), "warn" if attached.warnings else "ok")
            self.adapter_attached.emit(str(path))

        job = self._run(
            f"attaching {name}",
            run,
            done,
            marker=f"attached {name}",
            refusal=lambda op: op.on_refusal(
                VocabularyMismatch, lambda mismatch: self._offer_resize(path, name, mismatch), when=resizable
            ),
        )
        if job is not None:
            self.show_message(f"attaching {name}…")
        return job

    def _offer_resize(self, path: str, name: str, mismatch: VocabularyMismatch) -> None:
        if self.confirm_resize(mismatch):
            self.attach(path, name, resize_embeddings=True)
        else:
            self.show_message(f"{mismatch.message} — not attached", "warn")

    def activate_selected(self) -> None:
        name = self.selected_name()
        if name == BASE_ROW:
            self.disable_all()
        elif name:
            self.activate(name)

    def activate(self, name: str) -> Job | None:
        return self._run(
            f"activating {name}",
            lambda session, *, cancel, report: session.activate(name),
            lambda _: self.show_message(f"{name} is active", "ok"),
        )

    def disable_all(self) -> Job | None:
        return self._run(
            "disabling adapters",
            lambda session, *, cancel, report: session.disable_adapters(),
            lambda _: self.show_message("adapters off: the model behaves as the base", "ok"),
            marker="adapters off",
        )

    def _release_job(self, label: str, expected: int, release: Callable[[], object]) -> Job | None:
        sampler = self.sampler
        on_gpu = str(self.state.device or "").startswith("cuda")

        def run(session: Session, *, cancel: CancelToken, report: Report) -> Reclaimed | None:
            if sampler is None:
                release()
                return None
            return measure_release(sampler, release, label=label, expected_bytes=expected, on_gpu=on_gpu)[1]

        def done(reclaimed: Reclaimed | None) -> None:
            if reclaimed is None:
                self.show_message(label, "ok")
                return
            self.show_message(reclaimed.message(), "warn" if reclaimed.leaked else "ok")
            self.released.emit(reclaimed)

        return self._run(label, run, done, marker=label)

    def detach_selected(self) -> Job | None:
        name = self.selected_name()
        if name and name != BASE_ROW:
            return self.detach(name)
        return None

    def detach(self, name: str) -> Job | None:
        """Take the adapter off the model and free its memory (the session's ``delete``); its files stay."""
        size = next((a[2] for a in self.state.adapters if a[0] == name), 0)
        self._inspections.pop(name, None)
        session = self.session
        return self._release_job(f"detached {name}", size, lambda: session.delete(name))

    def unload_all(self) -> Job | None:
        """Detach every adapter, after :attr:`confirm_unload` says yes (None when it says no)."""
        names = [a[0] for a in self.state.adapters]
        if not names or not self.confirm_unload(names):
            return None
        size = sum(a[2] for a in self.state.adapters)
        self._inspections.clear()
        session = self.session
        return self._release_job("unloaded all adapters", size, session.unload_all)

    def generate(self) -> Job | None:
        """Try it: generate with the active adapter (or the base), streamed (see :class:`TryItBox`)."""
        return self.try_it.generate()

    # -- inspector (a keyed side job: selecting another adapter supersedes it) ---------------------------------------
    def _selection_changed(self) -> None:
        self.update_buttons()
        name = self.selected_name()
        if name == BASE_ROW:  # the base has no adapter to inspect: an empty inspector, not the last adapter's
            self.inspector.clear("the base model: no adapter is applied")
            return
        if not name:
            return
        path = next((a[1] for a in self.state.adapters if a[0] == name), None)
        if path is None:
            return
        if name in self._inspections:
            if self._inspections[name][0] is not self.inspection:  # the list was rebuilt: nothing new to draw
                self._show_inspected(*self._inspections[name])
            return
        from lora_studio.core.adapters.inspection import inspect_adapter
        from lora_studio.core.adapters.training_log import read_loss_log

        params = self.state.params

        def run(session: Session, *, cancel: CancelToken, report: Report) -> Inspected:
            return inspect_adapter(Path(path), name=name, base_params=params), read_loss_log(Path(path))

        def done(result: Inspected) -> None:
            self._inspections[name] = result
            if self.selected_name() == name:
                self._show_inspected(*result)

        self.op(f"inspecting {name}", run, exclusive=False, key="inspect", progress=False).on_success(done).on_failure(
            lambda desc: self.inspector.show_error(desc.message)
        ).on_cancel(lambda: None).run()

    def _show_inspected(self, inspection: AdapterInspection, loss: TrainingLog | str | None) -> None:
        self.inspector.show_inspection(inspection)
        self.inspector.show_loss(loss)
