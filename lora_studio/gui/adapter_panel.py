"""Adapters on the loaded base: attach, switch, disable all, delete, unload; an inspector; a quick test box."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (QFileDialog, QFormLayout, QFrame, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                               QPlainTextEdit, QPushButton, QScrollArea, QSpinBox, QSplitter, QTreeWidget,
                               QTreeWidgetItem, QVBoxLayout, QWidget)

from lora_studio.core.adapters.compatibility import VocabularyMismatch
from lora_studio.core.errors import UserError
from lora_studio.core.system.memory import MemorySampler, format_bytes, measure_release
from lora_studio.core.session import Session, SessionState
from lora_studio.gui.jobs import JobRunner
from lora_studio.gui.widgets import MessageLine, job_progress_bar, reset_progress, show_progress

BASE_ROW = "__base__"
_LAYER = re.compile(r"\.(\d+)\.")


def per_layer_norms(modules) -> tuple[list[str], list[float]]:
    """‖ΔW‖ per transformer layer (root of the sum of squares over its modules); other modules by name."""
    layers: dict[int, float] = {}
    others: dict[str, float] = {}
    for m in modules:
        match = _LAYER.search(m.module)
        if match:
            layers[int(match.group(1))] = layers.get(int(match.group(1)), 0.0) + m.delta_norm ** 2
        else:
            others[m.module.rsplit(".", 1)[-1]] = others.get(m.module, 0.0) + m.delta_norm ** 2
    labels = [str(i) for i in sorted(layers)] + list(others)
    values = [layers[i] ** 0.5 for i in sorted(layers)] + [v ** 0.5 for v in others.values()]
    return labels, values


def read_loss_log(folder: Path):
    """The adapter's loss.csv as a TrainingLog, its one-line problem as a str, or None when there is none."""
    from lora_studio.core.adapters.training_log import find_loss_csv, read_loss_csv

    path = find_loss_csv(folder) if folder.is_dir() else None
    if path is None:
        return None
    try:
        return read_loss_csv(path)
    except UserError as exc:
        return str(exc)


class AdapterPanel(QWidget):
    changed = Signal(object)  # SessionState after any adapter change
    event = Signal(str)  # a chart marker: "attached alpha", "deleted beta"
    released = Signal(object)  # core.memory.Reclaimed after delete/unload
    adapter_attached = Signal(str)  # folder path, for the Recent menu

    def __init__(self, runner: JobRunner, session: Session, sampler: Optional[MemorySampler] = None, parent=None) -> None:
        super().__init__(parent)
        self.runner, self.session, self.sampler = runner, session, sampler
        self.state: Optional[SessionState] = None
        self._inspections: dict[str, object] = {}
        self.inspection = None
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
        self.progress = job_progress_bar()
        self.message = MessageLine()
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

        # inspector
        self.inspector = QGroupBox("Inspector")
        form = QFormLayout()
        self.fields: dict[str, QLabel] = {}
        for key in ("name", "rank r", "alpha", "scaling", "targets", "params", "file", "notes"):
            label = QLabel("–")
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            self.fields[key] = label
            form.addRow(key, label)
        self.chart_host = QVBoxLayout()
        self.chart_title = QLabel("‖ΔW‖ per layer (Frobenius norm of scaling·B·A)")
        self.chart_title.setStyleSheet("color: palette(mid);")
        insp_layout = QVBoxLayout(self.inspector)
        insp_layout.addLayout(form)
        insp_layout.addWidget(self.chart_title)
        insp_layout.addLayout(self.chart_host, 1)
        self.chart = None
        # training loss from loss.csv beside the adapter; hidden when there is none
        self.loss_box = QWidget()
        loss_layout = QVBoxLayout(self.loss_box)
        loss_layout.setContentsMargins(0, 0, 0, 0)
        self.loss_title = QLabel("training loss (loss.csv)")
        self.loss_title.setStyleSheet("color: palette(mid);")
        self.loss_title.setWordWrap(True)
        loss_layout.addWidget(self.loss_title)
        self.loss_host = QVBoxLayout()
        loss_layout.addLayout(self.loss_host, 1)
        self.loss_box.hide()
        insp_layout.addWidget(self.loss_box, 1)
        self.loss_chart = None
        self.loss_values = None  # (train steps, train values, val steps, val values) as drawn
        self._loss_logs: dict[str, object] = {}
        self.fields["name"].setText("select an adapter in the list to inspect it")

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

        upper = QSplitter(Qt.Horizontal)
        upper.addWidget(list_box)
        # scrolled: the filled-in inspector (eight fields, two charts) is taller than a laptop screen allows,
        # and unscrolled its minimum height made the whole window grow, and every chart re-lay out, mid-job
        inspector_scroll = QScrollArea()
        inspector_scroll.setWidgetResizable(True)
        inspector_scroll.setFrameShape(QFrame.NoFrame)
        inspector_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # the fields wrap instead
        inspector_scroll.setWidget(self.inspector)
        upper.addWidget(inspector_scroll)
        upper.setStretchFactor(0, 3)
        upper.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(upper, 1)
        layout.addWidget(gen_box)
        self.setAcceptDrops(False)  # the window handles drops
        runner.busy_changed.connect(lambda _: self._update_buttons())
        self.show_state(session.state())

    # -- state --------------------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        self.state = state
        selected = self.selected_name()
        self.tree.clear()
        if state.base:
            base = QTreeWidgetItem(["", "(base, adapters off)", "", state.base])
            base.setData(1, Qt.UserRole, BASE_ROW)
            base.setToolTip(1, "the base model's own behaviour")
            self.tree.addTopLevelItem(base)
            if state.active_adapter is None:
                self._mark(base)
            for name, path, size in state.adapters:
                item = QTreeWidgetItem(["", name, format_bytes(size), path])
                item.setData(1, Qt.UserRole, name)
                item.setToolTip(3, path)
                item.setToolTip(2, "memory its weights take in the loaded model")
                self.tree.addTopLevelItem(item)
                if name == state.active_adapter:
                    self._mark(item)
                if name == selected:
                    item.setSelected(True)
        self._update_buttons()
        names = {a[0] for a in state.adapters}
        if self.inspection is not None and self.inspection.name not in names:
            self.clear_inspector()

    def _mark(self, item: QTreeWidgetItem) -> None:
        item.setText(0, "●")
        item.setToolTip(0, "active")
        font = QFont(item.font(1))
        font.setBold(True)
        for col in range(4):
            item.setFont(col, font)

    def active_row(self) -> Optional[str]:
        for i in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(i)
            if item.text(0) == "●":
                return item.data(1, Qt.UserRole)
        return None

    def selected_name(self) -> Optional[str]:
        items = self.tree.selectedItems()
        return items[0].data(1, Qt.UserRole) if items else None

    def select(self, name: str) -> None:
        for i in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(i)
            if item.data(1, Qt.UserRole) == name:
                self.tree.setCurrentItem(item)
                return

    def _update_buttons(self) -> None:
        busy = self.runner.busy_reason
        loaded = bool(self.state and self.state.base)
        has = bool(self.state and self.state.adapters)
        sel = self.selected_name()
        reasons = {
            self.attach_btn: busy or ("" if loaded else "load a base model first"),
            self.activate_btn: busy or ("" if sel else "select an adapter in the list"),
            self.disable_btn: busy or ("" if has else "no adapters attached"),
            self.delete_btn: busy or ("" if sel and sel != BASE_ROW else "select an adapter to delete"),
            self.unload_btn: busy or ("" if has else "no adapters attached"),
            self.generate_btn: busy or ("" if loaded else "load a base model first"),
        }
        tips = {self.attach_btn: "Attach a PEFT LoRA adapter folder (adapter_config.json + weights)",
                self.activate_btn: "Make the selected adapter the active one",
                self.disable_btn: "Base behaviour; adapters stay attached",
                self.delete_btn: "Remove the selected adapter and free its memory",
                self.unload_btn: "Remove every adapter; keep the base",
                self.generate_btn: "Generate with the active adapter"}
        for button, reason in reasons.items():
            button.setEnabled(not reason)
            button.setToolTip(reason or tips[button])
        current = self.runner.current
        self.cancel_btn.setEnabled(current is not None)

    # -- jobs ---------------------------------------------------------------------------------------------------------
    def _run(self, name: str, fn, on_done, *, marker: Optional[str] = None):
        def done(result):
            self._idle_progress()
            on_done(result)
            self.show_state(self.session.state())
            self.changed.emit(self.state)
            if marker and not isinstance(result, Exception):  # a refusal handed back for a question marks nothing
                self.event.emit(marker)

        def failed(desc):
            self._idle_progress()
            self.message.show_message(desc.message, "error")
            self.show_state(self.session.state())

        def cancelled():
            self._idle_progress()
            self.message.show_message(f"{name} cancelled", "warn")
            self.show_state(self.session.state())

        self.progress.show()
        self.progress.setRange(0, 0)
        job = self.runner.submit(name, fn, on_done=done, on_error=failed, on_cancel=cancelled,
                                 on_progress=lambda p: show_progress(self.progress, p))
        self._update_buttons()
        return job

    def _idle_progress(self) -> None:
        reset_progress(self.progress)
        self.progress.hide()

    def clear_inspector(self) -> None:
        self.inspection = None
        self.show_loss(None)
        for label in self.fields.values():
            label.setText("–")
        self.fields["name"].setText("select an adapter in the list to inspect it")
        if self.chart is not None:
            self.chart.getPlotItem().clear()

    def browse_attach(self) -> None:
        start = str(Path(self.state.adapters[-1][1]).parent) if self.state and self.state.adapters else str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose a LoRA adapter folder", start)
        if path:
            self.attach(path)

    def unique_name(self, path: str) -> str:
        base = re.sub(r"[.\s]+", "-", Path(path).name.strip()) or "adapter"
        taken = {a[0] for a in (self.state.adapters if self.state else ())}
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    def attach(self, path: str, name: Optional[str] = None, *, resize_embeddings: bool = False):
        name = name or self.unique_name(path)
        session = self.session

        def run(*, cancel, report):
            try:
                return session.attach(Path(path), name, resize_embeddings=resize_embeddings, cancel=cancel, report=report)
            except VocabularyMismatch as mismatch:
                if resize_embeddings or not mismatch.adapter_has_tokenizer or mismatch.adapter_vocab < mismatch.base_vocab:
                    raise
                return mismatch  # the GUI thread asks the user, then attaches again with resizing

        def done(attached):
            if isinstance(attached, VocabularyMismatch):
                self._offer_resize(path, name, attached)
                return
            text = f"attached {attached.name} ({format_bytes(attached.size_bytes)})"
            if attached.warnings:
                self.message.show_message(text + " — " + "; ".join(attached.warnings), "warn")
            else:
                self.message.show_message(text, "ok")
            self.adapter_attached.emit(str(path))

        self.message.show_message(f"attaching {name}…")
        return self._run(f"attaching {name}", run, done, marker=f"attached {name}")

    def _offer_resize(self, path: str, name: str, mismatch: VocabularyMismatch) -> None:
        if self.confirm_resize(mismatch):
            self.attach(path, name, resize_embeddings=True)
        else:
            self.message.show_message(f"{mismatch.message} — not attached", "warn")

    def _ask_resize(self, mismatch: VocabularyMismatch) -> bool:
        from PySide6.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self, "Resize the vocabulary?",
            f"{mismatch.message}.\n\nThe adapter folder has its own tokenizer with the added tokens. Resize the base's "
            f"embeddings to {mismatch.adapter_vocab} tokens and use that tokenizer? (The files on disk are not changed; "
            "a merge saves the adapter's tokenizer with the model.)",
            QMessageBox.Yes | QMessageBox.No, QMessageBox.Yes)
        return answer == QMessageBox.Yes

    def activate_selected(self) -> None:
        name = self.selected_name()
        if name == BASE_ROW:
            self.disable_all()
        elif name:
            self.activate(name)

    def activate(self, name: str):
        session = self.session
        return self._run(f"activating {name}", lambda *, cancel, report: session.activate(name),
                         lambda _: self.message.show_message(f"{name} is active", "ok"))

    def disable_all(self):
        session = self.session
        return self._run("disabling adapters", lambda *, cancel, report: session.disable_adapters(),
                         lambda _: self.message.show_message("adapters off: the model behaves as the base", "ok"),
                         marker="adapters off")

    def _release_job(self, label: str, expected: int, release):
        sampler, session = self.sampler, self.session
        on_gpu = str(session.device or "").startswith("cuda")

        def run(*, cancel, report):
            if sampler is None:
                release()
                return None
            return measure_release(sampler, release, label=label, expected_bytes=expected, on_gpu=on_gpu)[1]

        def done(reclaimed):
            if reclaimed is None:
                self.message.show_message(label, "ok")
                return
            self.message.show_message(reclaimed.message(), "warn" if reclaimed.leaked else "ok")
            self.released.emit(reclaimed)

        return self._run(label, run, done, marker=label)

    def delete_selected(self):
        name = self.selected_name()
        if name and name != BASE_ROW:
            return self.delete(name)
        return None

    def delete(self, name: str):
        size = next((a[2] for a in (self.state.adapters if self.state else ()) if a[0] == name), 0)
        self._inspections = {k: v for k, v in self._inspections.items() if k != name}
        session = self.session
        return self._release_job(f"deleted {name}", size, lambda: session.delete(name))

    def unload_all(self):
        size = sum(a[2] for a in (self.state.adapters if self.state else ()))
        self._inspections.clear()
        session = self.session
        return self._release_job("unloaded all adapters", size, session.unload_all)

    def generate(self):
        from lora_studio.core.generation.generate import GenerationSettings, generate

        prompt = self.prompt_edit.text()
        settings = GenerationSettings(max_new_tokens=self.max_tokens.value())
        session = self.session
        who = (self.state.active_adapter if self.state else None) or "base"

        def run(*, cancel, report):
            with session.lock:
                model = session.require_loaded()
                return generate(model, session.tokenizer, prompt, settings, cancel=cancel, report=report)

        def done(generated):
            self.output.setPlainText(generated.text)
            self.message.show_message(f"{who}: {len(generated.token_ids)} tokens", "ok")

        self.output.setPlainText("")
        return self._run(f"generating with {who}", run, done)

    # -- inspector ----------------------------------------------------------------------------------------------------
    def _selection_changed(self) -> None:
        self._update_buttons()
        name = self.selected_name()
        if not name or name == BASE_ROW or not self.state:
            return
        path = next((a[1] for a in self.state.adapters if a[0] == name), None)
        if path is None:
            return
        if name in self._inspections:
            self.show_inspection(self._inspections[name])
            self.show_loss(self._loss_logs.get(name))
            return
        from lora_studio.core.adapters.inspection import inspect_adapter

        params = self.state.params

        def run(*, cancel, report):
            return inspect_adapter(Path(path), name=name, base_params=params), read_loss_log(Path(path))

        def done(result):
            insp, loss = result
            self._inspections[name] = insp
            self._loss_logs[name] = loss
            if self.selected_name() == name:
                self.show_inspection(insp)
                self.show_loss(loss)

        self.runner.submit(f"inspecting {name}", run, exclusive=False, key="inspect", on_done=done,
                           on_error=lambda d: self.fields["notes"].setText(d.message))

    def show_inspection(self, insp) -> None:
        self.inspection = insp
        f = self.fields
        f["name"].setText(f"<b>{insp.name}</b> ({insp.peft_type}{', DoRA' if insp.use_dora else ''}{', rsLoRA' if insp.use_rslora else ''})")
        f["rank r"].setText(str(insp.r))
        f["alpha"].setText(f"{insp.lora_alpha:g}")
        f["scaling"].setText(f"{insp.scaling:g}")
        targets = insp.target_modules
        f["targets"].setText(", ".join(sorted(targets)) if isinstance(targets, (list, tuple, set)) else str(targets))
        pct = f" ({insp.percent_of_base:.3f}% of base)" if insp.percent_of_base is not None else ""
        f["params"].setText(f"{insp.params:,}{pct} in {len(insp.modules)} modules")
        f["file"].setText(f"{insp.weights_file}, {format_bytes(insp.weights_bytes)}")
        f["notes"].setText("; ".join(insp.warnings) or "–")
        self._draw_chart(insp)

    def build_charts(self) -> None:
        """Create the ‖ΔW‖ and loss charts (once; ~50-100 ms of pyqtgraph set-up on the GUI thread).

        The window calls this while idle, right after pyqtgraph's import, so that selecting the first
        adapter only fills them in; otherwise it happens on first use.
        """
        import pyqtgraph as pg  # lazy: ~1 s to import, preloaded after the window shows

        if self.chart is None:
            self.chart = _static_plot(pg, 120, "layer", "‖ΔW‖", x_grid=False)
            self.chart_host.addWidget(self.chart, 1)
        if self.loss_chart is None:
            self.loss_chart = _static_plot(pg, 110, "step", "loss", x_grid=True)
            self.loss_chart.addLegend(offset=(-6, 4), brush=pg.mkBrush(255, 255, 255, 210), labelTextSize="8pt")
            self.loss_host.addWidget(self.loss_chart, 1)

    def _draw_chart(self, insp) -> None:
        import pyqtgraph as pg

        self.build_charts()
        labels, values = per_layer_norms(insp.modules)
        plot = self.chart.getPlotItem()
        plot.clear()
        xs = list(range(len(values)))
        plot.addItem(pg.BarGraphItem(x=xs, height=values, width=0.7, brush="#4c78a8"))
        # at most ~12 labelled bars (every layer of a 30-layer model is unreadable, and each label costs
        # text layout in every axis repaint); the others are minor ticks without text
        step = max(1, -(-len(xs) // 12))
        major = [(x, label) for x, label in zip(xs, labels) if x % step == 0]
        plot.getAxis("bottom").setTicks([major, [(x, "") for x in xs if x % step]])
        if xs:
            plot.setXRange(-0.6, len(xs) - 0.4, padding=0)
            plot.setYRange(0, max(values) * 1.1 or 1, padding=0)
        self.chart_values = (labels, values)

    def show_loss(self, log) -> None:
        """Train/validation loss from the adapter's loss.csv; hidden when it has none."""
        if log is None:
            self.loss_box.hide()
            self.loss_values = None
            return
        self.loss_box.show()
        if isinstance(log, str):
            self.loss_title.setText(f"training loss: {log}")
            if self.loss_chart is not None:
                self.loss_chart.hide()
            self.loss_values = None
            return
        import pyqtgraph as pg

        self.build_charts()
        self.loss_chart.show()
        plot = self.loss_chart.getPlotItem()
        plot.clear()
        train, val = log.train, log.val
        if len(train):
            plot.plot(list(train.steps), list(train.values), pen=pg.mkPen("#4c78a8", width=2), name="train")
        if len(val):
            plot.plot(list(val.steps), list(val.values), pen=pg.mkPen("#e45756", width=2), name="validation",
                      symbol="o", symbolSize=5, symbolBrush="#e45756", symbolPen=None)
        parts = [f"train {train.last:.3f} (best {train.best:.3f})" if len(train) else "",
                 f"validation {val.last:.3f} (best {val.best:.3f})" if len(val) else ""]
        title = "training loss (loss.csv): " + ", ".join(p for p in parts if p)
        if log.warnings:
            title += " — " + "; ".join(log.warnings)
        self.loss_title.setText(title)
        self.loss_values = (list(train.steps), list(train.values), list(val.steps), list(val.values))


def _static_plot(pg, min_height: int, bottom: str, left: str, x_grid: bool):
    """A white pyqtgraph plot without mouse interaction, menu or buttons (the inspector's charts)."""
    plot = pg.PlotWidget()
    plot.setMinimumHeight(min_height)
    plot.setBackground("w")
    plot.showGrid(x=x_grid, y=True, alpha=0.25)
    plot.setMouseEnabled(x=False, y=False)
    plot.hideButtons()
    plot.getPlotItem().setMenuEnabled(False)
    plot.setLabel("bottom", bottom)
    plot.setLabel("left", left)
    return plot
