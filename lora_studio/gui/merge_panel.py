"""The Merge tab: pick adapters (and weights), see what each engine would need, merge and save, verify.

Everything heavy is the core's (core/merge.py): ``plan_merge`` runs as a keyed read-only
side job whenever the inputs change (debounced), ``merge_and_save`` as one exclusive
model job through the window's JobRunner. The panel reads the session only through
``Session.state()`` snapshots taken while no model job runs (on ``busy_changed("")``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGridLayout, QGroupBox,
                               QHBoxLayout, QLabel, QLineEdit, QMessageBox, QPushButton, QScrollArea,
                               QSizePolicy, QVBoxLayout, QWidget)
from superqt import QLabeledDoubleSlider

from lora_studio.core.adapters.combinations import COMBINATIONS, NEEDS_DENSITY
from lora_studio.core.errors import UserError
from lora_studio.core.system.memory import format_bytes
from lora_studio.core.merge.run import DTYPES, AdapterSpec, MergeOptions, MergePlan, merge_and_save, plan_merge
from lora_studio.core.session import SessionState
from lora_studio.gui.widgets import STYLES, MessageLine, job_progress_bar, reset_progress, show_progress

PLAN_DEBOUNCE_MS = 300
PLAN_KEY = "merge-plan"
ENGINE_CHOICES = (("auto", None), ("streaming", "streaming"), ("in-memory", "in-memory"))
BADGES = {
    "pass": ("✔ verified", "color: white; background: #2a7a2a; padding: 3px 8px; border-radius: 4px; font-weight: bold;"),
    "warn": ("⚠ check", "color: white; background: #c06000; padding: 3px 8px; border-radius: 4px; font-weight: bold;"),
    None: ("saved, not verified", "color: white; background: #777; padding: 3px 8px; border-radius: 4px;"),
}


class AdapterRow:
    """One attached adapter: a checkbox (merge it?) and its weight in a combination."""

    def __init__(self, name: str, path: str, mergeable: bool) -> None:
        self.name, self.path, self.mergeable = name, path, mergeable
        self.check = QCheckBox(name)
        self.check.setToolTip(path if mergeable else
                              f"{path}\n(a combination built for Compare: tick its adapters here to merge it)")
        self.check.setEnabled(mergeable)
        self.slider = QLabeledDoubleSlider(Qt.Horizontal)
        self.slider.setRange(0.0, 2.0)
        self.slider.setSingleStep(0.05)
        self.slider.setDecimals(2)
        self.slider.setValue(1.0)
        self.slider.setMinimumWidth(160)
        self.slider.setToolTip("weight of this adapter in the combination (0–2)")

    @property
    def checked(self) -> bool:
        return self.mergeable and self.check.isChecked()

    @property
    def weight(self) -> float:
        return round(float(self.slider.value()), 4)


class MergePanel(QWidget):
    def __init__(self, studio, parent=None) -> None:
        """``studio``: the MainWindow (its runner, session, memory/log panels, tabs, compare panel)."""
        super().__init__(parent)
        self.studio = studio  # not "window": QWidget.window() must keep working
        self.runner, self.session = studio.runner, studio.session
        self.state: Optional[SessionState] = None
        self.source = None  # the session's ModelSource, read with the state
        self.rows: list[AdapterRow] = []
        self.plan: Optional[MergePlan] = None
        self.plan_error = ""
        self.plan_pending = False
        self._plan_seq = 0
        self.merge_job = None
        self.result = None
        self._dtype_for: Optional[str] = None  # the base whose dtype the dtype box was last set to
        # Injectable for tests: answer the overwrite question, open a file or folder.
        self.confirm_overwrite: Callable[[Path], bool] = self._ask_overwrite
        self.open_url: Callable[[QUrl], object] = QDesktopServices.openUrl

        self._plan_timer = QTimer(self)
        self._plan_timer.setSingleShot(True)
        self._plan_timer.setInterval(PLAN_DEBOUNCE_MS)
        self._plan_timer.timeout.connect(self.refresh_plan)

        # -- adapters ----------------------------------------------------------------------------------------------
        adapters_box = QGroupBox("Adapters to merge")
        self.rows_host = QWidget()
        self.rows_grid = QGridLayout(self.rows_host)
        self.rows_grid.setContentsMargins(2, 2, 2, 2)
        self.rows_grid.setColumnStretch(1, 1)
        self.no_adapters = QLabel("Attach an adapter in the Adapters tab; it appears here.")
        self.no_adapters.setStyleSheet("color: palette(mid);")
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.rows_host)
        scroll.setMinimumHeight(110)
        self.combo_type = QComboBox()
        self.combo_type.addItems(COMBINATIONS)
        self.combo_type.setToolTip("how several adapters are combined (PEFT add_weighted_adapter)")
        self.density = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, decimals=2, value=0.5)
        self.density.setToolTip("fraction of entries kept (ties, dare_linear, dare_ties, magnitude_prune)")
        self.mode_label = QLabel("")
        self.mode_label.setWordWrap(True)
        self.mode_label.setStyleSheet("color: palette(mid);")
        self.preview_btn = QPushButton("Preview in Compare")
        self.preview_btn.clicked.connect(self.preview_in_compare)
        combo_row = QHBoxLayout()
        combo_row.addWidget(QLabel("Combination"))
        combo_row.addWidget(self.combo_type)
        combo_row.addWidget(QLabel("density"))
        combo_row.addWidget(self.density)
        combo_row.addStretch(1)
        combo_row.addWidget(self.preview_btn)
        ad_layout = QVBoxLayout(adapters_box)
        ad_layout.addWidget(self.no_adapters)
        ad_layout.addWidget(scroll, 1)
        ad_layout.addLayout(combo_row)
        ad_layout.addWidget(self.mode_label)

        # -- output ------------------------------------------------------------------------------------------------
        out_box = QGroupBox("Output")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("folder for the merged model (created)")
        self.out_edit.setClearButtonEnabled(True)
        browse = QPushButton("Choose…")
        browse.clicked.connect(self.browse_out)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(browse)
        self.dtype_combo = QComboBox()
        self.dtype_combo.addItems(DTYPES)
        self.dtype_combo.setToolTip("dtype of the saved weights (default: the base's)")
        self.engine_combo = QComboBox()
        for label, value in ENGINE_CHOICES:
            self.engine_combo.addItem(label, value)
        self.engine_combo.setToolTip("auto: streaming (one tensor at a time, low memory) where it applies, else in-memory")
        self.engine_note = QLabel("")
        self.engine_note.setWordWrap(True)
        self.engine_note.setStyleSheet("color: palette(mid);")
        self.verify_check = QCheckBox("Verify after saving")
        self.verify_check.setChecked(True)
        self.verify_check.setToolTip("load the saved folder plainly and compare its logits with the adapter model")
        self.safe_check = QCheckBox("Safe merge (NaN/Inf check)")
        self.safe_check.setToolTip("PEFT's safe_merge: check each merged weight for NaN/Inf (in-memory engine; "
                                   "the streaming engine always checks float16 for Inf)")
        checks = QHBoxLayout()
        checks.addWidget(self.verify_check)
        checks.addWidget(self.safe_check)
        checks.addStretch(1)
        form = QFormLayout(out_box)
        form.addRow("Folder", out_row)
        form.addRow("dtype", self.dtype_combo)
        form.addRow("Engine", self.engine_combo)
        form.addRow("", self.engine_note)
        form.addRow("", checks)

        top = QHBoxLayout()
        top.addWidget(adapters_box, 3)
        top.addWidget(out_box, 2)

        # -- plan --------------------------------------------------------------------------------------------------
        plan_box = QGroupBox("Before starting: what each engine needs")
        self.plan_grid = QGridLayout()
        self.plan_grid.setHorizontalSpacing(16)
        for col, title in enumerate(("engine", "peak RAM", "peak VRAM", "+ verification RAM", "")):
            label = QLabel(f"<b>{title}</b>")
            self.plan_grid.addWidget(label, 0, col)
        self.plan_cells: dict[str, list[QLabel]] = {}
        for row, engine in enumerate(("streaming", "in-memory"), start=1):
            cells = [QLabel(engine)] + [QLabel("–") for _ in range(4)]
            cells[4].setWordWrap(True)
            cells[4].setStyleSheet("color: palette(mid);")
            cells[4].setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
            for col, cell in enumerate(cells):
                self.plan_grid.addWidget(cell, row, col)
            self.plan_cells[engine] = cells
        self.plan_grid.setColumnStretch(4, 1)
        self.disk_label = QLabel("")
        self.disk_label.setWordWrap(True)
        plan_layout = QVBoxLayout(plan_box)
        plan_layout.addLayout(self.plan_grid)
        plan_layout.addWidget(self.disk_label)

        # -- run ---------------------------------------------------------------------------------------------------
        self.merge_btn = QPushButton("Merge && save")
        self.merge_btn.setDefault(True)
        self.merge_btn.setMinimumWidth(130)
        self.merge_btn.clicked.connect(self.start_merge)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel_merge)
        self.progress = job_progress_bar()
        self.reason_label = QLabel("")
        self.reason_label.setWordWrap(True)
        self.reason_label.setStyleSheet(STYLES["warn"])
        for b in (self.merge_btn, self.cancel_btn):
            b.setSizePolicy(QSizePolicy.Fixed, QSizePolicy.Fixed)
        run_row = QHBoxLayout()
        run_row.addWidget(self.merge_btn)
        run_row.addWidget(self.cancel_btn)
        run_row.addWidget(self.progress, 1)
        run_row.addWidget(self.reason_label, 1)
        run_row.addStretch(0)

        # -- result ------------------------------------------------------------------------------------------------
        self.result_box = QGroupBox("Result")
        self.badge = QLabel("")
        self.badge.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.numbers = QLabel("")
        self.numbers.setWordWrap(True)
        self.numbers.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.saved_label = QLabel("")
        self.saved_label.setWordWrap(True)
        self.saved_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.card_btn = QPushButton("Open model card")
        self.card_btn.clicked.connect(self.open_card)
        self.folder_btn = QPushButton("Open folder")
        self.folder_btn.clicked.connect(self.open_folder)
        self.compare_merged_btn = QPushButton("Compare merged vs adapter")
        self.compare_merged_btn.clicked.connect(self.compare_merged)
        badge_row = QHBoxLayout()
        badge_row.addWidget(self.badge)
        badge_row.addWidget(self.numbers, 1)
        result_buttons = QHBoxLayout()
        for b in (self.card_btn, self.folder_btn, self.compare_merged_btn):
            result_buttons.addWidget(b)
        result_buttons.addStretch(1)
        res_layout = QVBoxLayout(self.result_box)
        res_layout.addLayout(badge_row)
        res_layout.addWidget(self.saved_label)
        res_layout.addLayout(result_buttons)
        self.result_box.hide()

        self.message = MessageLine()

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(plan_box)
        layout.addLayout(run_row)
        layout.addWidget(self.result_box)
        layout.addWidget(self.message)
        layout.addStretch(1)

        for signal in (self.combo_type.currentIndexChanged, self.density.valueChanged, self.out_edit.textChanged,
                       self.dtype_combo.currentIndexChanged, self.engine_combo.currentIndexChanged,
                       self.verify_check.toggled, self.safe_check.toggled):
            signal.connect(self._inputs_changed)
        self.runner.busy_changed.connect(self._busy_changed)
        self._sync_from_session()

    # -- session state (read only while no model job runs) --------------------------------------------------------
    def _busy_changed(self, reason: str) -> None:
        if not reason:
            self._sync_from_session()
        self._update_buttons()

    def _sync_from_session(self) -> None:
        if self.runner.current is not None:
            return  # the threading rule: no state() while a model job runs
        state = self.session.state()
        source = self.session.source
        if state != self.state or source is not self.source:
            self.show_state(state, source)

    def show_state(self, state: SessionState, source=None) -> None:
        self.state, self.source = state, source
        if state.base_path != self._dtype_for and state.dtype in DTYPES:
            self._dtype_for = state.base_path
            self.dtype_combo.blockSignals(True)
            self.dtype_combo.setCurrentText(state.dtype)  # the base's dtype (core.merge.base_dtype with a session)
            self.dtype_combo.blockSignals(False)
        self._rebuild_rows(state)
        self._inputs_changed()

    def _rebuild_rows(self, state: SessionState) -> None:
        wanted = [(name, path) for name, path, _ in state.adapters]
        if wanted == [(r.name, r.path) for r in self.rows]:
            return
        old = {r.name: (r.check.isChecked(), r.weight) for r in self.rows}
        for r in self.rows:
            for w in (r.check, r.slider):
                self.rows_grid.removeWidget(w)
                w.deleteLater()
        self.rows = []
        for i, (name, path) in enumerate(wanted):
            # a combination previewed in Compare is registered with a description, not a folder
            row = AdapterRow(name, path, Path(path).is_dir())
            checked, weight = old.get(name, (None, 1.0))
            row.slider.setValue(weight)
            row.check.setChecked(bool(checked))
            row.check.toggled.connect(self._inputs_changed)
            row.slider.valueChanged.connect(self._inputs_changed)
            self.rows_grid.addWidget(row.check, i, 0)
            self.rows_grid.addWidget(row.slider, i, 1)
            self.rows.append(row)
        self.rows_grid.setRowStretch(len(self.rows), 1)
        if self.rows and not any(r.checked for r in self.rows):  # default: the active adapter (or the only one)
            pick = next((r for r in self.rows if r.mergeable and r.name == state.active_adapter), None)
            pick = pick or next((r for r in self.rows if r.mergeable), None)
            if pick is not None:
                pick.check.setChecked(True)
        self.no_adapters.setVisible(not self.rows)

    # -- the request --------------------------------------------------------------------------------------------------
    def checked_rows(self) -> list[AdapterRow]:
        return [r for r in self.rows if r.checked]

    def out_path(self) -> Optional[Path]:
        text = self.out_edit.text().strip()
        return Path(text).expanduser().absolute() if text else None

    def request(self, out: Optional[Path] = None) -> tuple[list[AdapterSpec], MergeOptions]:
        """What the inputs ask for; raises UserError when they cannot make a merge."""
        rows = self.checked_rows()
        if not rows:
            raise UserError("no adapter ticked", "tick the adapter(s) to merge")
        combination = density = None
        if len(rows) == 1:
            specs = [AdapterSpec(rows[0].name, Path(rows[0].path), 1.0)]  # a single adapter: a plain merge
        else:
            specs = [AdapterSpec(r.name, Path(r.path), r.weight) for r in rows]
            combination = self.combo_type.currentText()
            density = round(self.density.value(), 4) if combination in NEEDS_DENSITY else None
        options = MergeOptions(out=out or self.out_path() or Path.home() / "merged-model",
                               dtype=self.dtype_combo.currentText(), engine=self.engine_combo.currentData(),
                               combination=combination, density=density, safe_merge=self.safe_check.isChecked(),
                               verify=self.verify_check.isChecked())
        return specs, options

    def _inputs_changed(self, *_args) -> None:
        rows = self.checked_rows()
        several = len(rows) > 1
        for r in self.rows:
            r.slider.setEnabled(several and r.checked)
        self.combo_type.setEnabled(several)
        self.density.setEnabled(several and self.combo_type.currentText() in NEEDS_DENSITY)
        if not rows:
            self.mode_label.setText("")
        elif several:
            self.mode_label.setText(f"{self.combo_type.currentText()} combination of {len(rows)} adapters "
                                    "(PEFT add_weighted_adapter), merged by the in-memory engine")
        else:
            self.mode_label.setText(f"plain merge of {rows[0].name} (weights apply to combinations of two or more)")
        # a new plan is due: Merge waits for it (the disk check must be current)
        self._plan_seq += 1
        self.plan_pending = True
        if self.studio_closed():
            return
        self._plan_timer.start()
        self._update_buttons()

    def studio_closed(self) -> bool:
        return bool(getattr(self.studio, "_closed", False))

    # -- the plan (a keyed read-only side job) ------------------------------------------------------------------------
    def refresh_plan(self):
        self._plan_timer.stop()
        if self.studio_closed():
            return None
        seq = self._plan_seq
        state, source = self.state, self.source
        if state is None or not state.base or source is None:
            return self._plan_done(seq, UserError("no base model is loaded", "load a base model first"))
        try:
            specs, options = self.request()
        except UserError as exc:
            return self._plan_done(seq, exc)
        # plan_merge reads the session's dtype/device/loaded only: hand it the snapshot, not the model
        view = SimpleNamespace(dtype=state.dtype, device=state.device, loaded=bool(state.base))

        def run(*, cancel, report):
            try:
                return plan_merge(source, specs, options, session=view)
            except UserError as exc:  # bad inputs are a reason shown by the button, not a failed job in the log
                return exc

        return self.runner.submit("checking the merge", run, exclusive=False, key=PLAN_KEY,
                                  on_done=lambda result: self._plan_done(seq, result),
                                  on_error=lambda desc: self._plan_done(seq, UserError(desc.message)))

    def _plan_done(self, seq: int, result) -> None:
        if seq != self._plan_seq:
            return  # the inputs changed meanwhile: a newer plan is on its way
        self.plan_pending = False
        if isinstance(result, UserError):
            self.plan, self.plan_error = None, str(result)
        else:
            self.plan, self.plan_error = result, ""
        self._show_plan()
        self._update_buttons()

    def _show_plan(self) -> None:
        plan = self.plan
        for engine, cells in self.plan_cells.items():
            pred = plan.predictions.get(engine) if plan else None
            chosen = plan is not None and plan.engine == engine
            cells[0].setText(f"<b>→ {engine}</b>" if chosen else engine)
            if pred is None:
                for c in cells[1:]:
                    c.setText("–")
                continue
            cells[1].setText(format_bytes(pred.peak_ram_bytes))
            cells[2].setText(format_bytes(pred.peak_vram_bytes) if pred.peak_vram_bytes else "–")
            cells[3].setText(format_bytes(pred.verify_ram_bytes) if pred.verify_ram_bytes else "–")
            cells[4].setText(pred.reason if pred.available else f"not available: {pred.reason}")
            cells[4].setToolTip(cells[4].text())
            for c in cells[:4]:
                c.setStyleSheet("" if pred.available else "color: palette(mid);")
        if plan is None:
            self.disk_label.setText("")
            self.engine_note.setText("")
            return
        out = self.out_path()
        if out is None:
            self.disk_label.setText(f"Disk: the output needs about {format_bytes(plan.output_bytes)}.")
            self.disk_label.setStyleSheet("")
        else:
            free = "unknown" if plan.disk_free_bytes is None else format_bytes(plan.disk_free_bytes)
            mark = "✔" if plan.disk_ok else "✖"
            self.disk_label.setText(f"Disk: {mark} the output needs about {format_bytes(plan.output_bytes)}; "
                                    f"{free} free at {out.parent}")
            self.disk_label.setStyleSheet(STYLES["ok"] if plan.disk_ok else STYLES["error"])
        self.engine_note.setText(self._engine_note(plan))

    def _engine_note(self, plan: MergePlan) -> str:
        stream = plan.predictions["streaming"]
        if self.engine_combo.currentData() is not None:
            return ""  # an explicit choice; a refusal is shown beside the Merge button
        if plan.engine == "streaming":
            return "auto → streaming: reads and writes one tensor at a time"
        if plan.engine == "in-memory":
            if self.safe_check.isChecked() and stream.available:
                why = "safe merge is PEFT's check, done in memory"
            else:
                why = f"streaming does not apply: {stream.reason}"
            return f"auto → in-memory ({why})"
        return ""

    # -- buttons --------------------------------------------------------------------------------------------------
    def start_reason(self) -> str:
        """'' when Merge may start; otherwise why not (shown beside the button)."""
        if self.runner.busy_reason:
            return self.runner.busy_reason
        if not (self.state and self.state.base):
            return "load a base model first"
        if not self.rows:
            return "attach an adapter first (Adapters tab)"
        if not self.checked_rows():
            return "tick the adapter(s) to merge"
        if self.out_path() is None:
            return "choose an output folder"
        if self.plan_pending:
            return "checking what the merge needs…"
        if self.plan_error:
            return self.plan_error
        if self.plan is not None and self.plan.refusal:
            hint = f" ({self.plan.refusal_hint})" if self.plan.refusal_hint else ""
            return f"cannot start: {self.plan.refusal}{hint}"
        return ""

    def _update_buttons(self) -> None:
        reason = self.start_reason()
        running = self.merge_job is not None and not self.merge_job.done
        self.merge_btn.setEnabled(not reason)
        self.merge_btn.setToolTip(reason or "merge the ticked adapter(s) into the base and save the folder")
        self.reason_label.setText("" if running else reason)
        self.reason_label.setVisible(not running and bool(reason))
        self.cancel_btn.setEnabled(running)
        compare = self._compare_panel()
        several = len(self.checked_rows()) > 1
        can_preview = (several and compare is not None and hasattr(compare, "add_combination_variant")
                       and not self.runner.busy_reason and not self.plan_error)
        self.preview_btn.setEnabled(can_preview)
        self.preview_btn.setToolTip("add this weighted combination as a variant in the Compare tab" if can_preview else
                                    "tick two or more adapters to preview their combination" if not several else
                                    "the Compare panel is not available" if compare is None else
                                    self.runner.busy_reason or self.plan_error or "")
        has_result = self.result is not None
        can_compare = has_result and compare is not None and hasattr(compare, "add_merged_variant") and not self.runner.busy_reason
        self.compare_merged_btn.setEnabled(can_compare)
        self.compare_merged_btn.setToolTip("load the saved folder beside the session and compare it with the adapter"
                                           if can_compare else self.runner.busy_reason or "the Compare panel is not available")

    def browse_out(self) -> None:
        start = self.out_edit.text().strip() or str(Path(self.state.base_path).parent if self.state and self.state.base_path
                                                    else Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose the output folder for the merged model", start)
        if path:
            self.out_edit.setText(path)

    def _ask_overwrite(self, path: Path) -> bool:
        answer = QMessageBox.question(self, "Overwrite?", f"Overwrite {path}?\n\nIts contents are replaced when the merge "
                                      "completes; until then it stays as it is.", QMessageBox.Yes | QMessageBox.No,
                                      QMessageBox.No)
        return answer == QMessageBox.Yes

    # -- merge --------------------------------------------------------------------------------------------------------
    def start_merge(self):
        """Start the merge job (after confirming an overwrite); returns the Job, or None when it did not start."""
        reason = self.start_reason()
        if reason:
            self.message.show_message(reason, "warn")
            return None
        out = self.out_path()
        try:
            specs, options = self.request(out)
        except UserError as exc:
            self.message.show_message(str(exc), "error")
            return None
        if out.is_dir() and any(out.iterdir()):
            if not self.confirm_overwrite(out):
                self.message.show_message(f"kept {out} as it is; nothing was written", "info")
                return None
            options = dataclasses.replace(options, overwrite=True)
        elif out.is_dir():
            options = dataclasses.replace(options, overwrite=True)  # an empty folder: nothing to lose
        session = self.session

        def run(*, cancel, report):
            return merge_and_save(session.source, specs, options, session=session, cancel=cancel, report=report)

        what = specs[0].name if len(specs) == 1 else f"{options.combination} of {len(specs)} adapters"
        try:
            job = self.runner.submit(f"merging {what} into {out.name}", run, on_done=self._merged,
                                     on_error=self._merge_failed, on_cancel=self._merge_cancelled,
                                     on_progress=lambda p: show_progress(self.progress, p))
        except UserError as exc:  # Busy
            self.message.show_message(str(exc), "warn")
            return None
        self.merge_job = job
        self.result = None
        self.result_box.hide()
        self.progress.show()
        self.progress.setRange(0, 0)
        self.message.show_message(f"merging {what} into {out}…")
        self._update_buttons()
        return job

    def cancel_merge(self) -> None:
        if self.merge_job is not None and not self.merge_job.done:
            self.merge_job.cancel()
            self.message.show_message("cancelling…")

    def _end_merge(self) -> None:
        self.merge_job = None
        reset_progress(self.progress)
        self.progress.hide()
        self._update_buttons()

    def _merged(self, result) -> None:
        self._end_merge()
        self.result = result
        v = result.verification
        text, style = BADGES[v.status if v is not None else None]
        self.badge.setText(text)
        self.badge.setStyleSheet(style)
        if v is not None:
            limits = v.thresholds
            self.numbers.setText(f"max |Δlogit| {v.max_abs_logit_diff:.3g} (≤ {limits[0]:g}) · mean KL {v.mean_kl:.3g} "
                                 f"(≤ {limits[1]:g}) · greedy agreement {v.greedy_agreement:.0%} (≥ {limits[2]:.0%}) "
                                 f"over {v.tokens_compared} tokens, {v.dtype}")
            self.numbers.setToolTip("the saved folder, loaded with plain AutoModelForCausalLM, against base + adapter "
                                    "through PEFT on the same tokens")
        else:
            self.numbers.setText("verification was off")
        self.saved_label.setText(f"Saved <b>{result.out}</b> — {result.engine} engine, {result.dtype}, "
                                 f"{len(result.files)} shard(s), {format_bytes(result.bytes_written)} in {result.seconds:.1f} s")
        self.result_box.show()
        kind = "ok" if v is None or v.status == "pass" else "warn"
        self.message.show_message(f"saved {result.out}" if v is None or v.status == "pass" else
                                  f"saved {result.out}, but the merged model differs more than expected for {v.dtype}: "
                                  "see the numbers above and the model card", kind)
        memory = getattr(self.studio, "memory_panel", None)
        if memory is not None:
            memory.mark("merged")
        log = getattr(self.studio, "log_panel", None)
        if log is not None:
            log.log(f"merged into {result.out}: {v.summary() if v else 'not verified'}", "info" if kind == "ok" else "warn")
        self._update_buttons()

    def _merge_failed(self, desc) -> None:
        self._end_merge()
        self.message.show_message(desc.message, "error")  # the details are in the log (the window logs failed jobs)

    def _merge_cancelled(self) -> None:
        self._end_merge()
        self.message.show_message("merge cancelled; no output folder was written (an existing one is unchanged)", "warn")

    # -- result actions -----------------------------------------------------------------------------------------------
    def open_card(self) -> None:
        if self.result is not None:
            self.open_url(QUrl.fromLocalFile(str(Path(self.result.out) / "README.md")))

    def open_folder(self) -> None:
        if self.result is not None:
            self.open_url(QUrl.fromLocalFile(str(self.result.out)))

    # -- the Compare tab ----------------------------------------------------------------------------------------------
    def _compare_panel(self):
        return getattr(self.studio, "compare_panel", None)

    def _show_compare_tab(self) -> None:
        tabs = getattr(self.studio, "tabs", None)
        if tabs is None:
            return
        for i in range(tabs.count()):
            if tabs.tabText(i) == "Compare":
                tabs.setCurrentIndex(i)
                return

    def variant_name(self, combination: str) -> str:
        taken = {a[0] for a in (self.state.adapters if self.state else ())}
        name, n = f"mix-{combination}", 2
        while name in taken:
            name, n = f"mix-{combination}-{n}", n + 1
        return name

    def preview_in_compare(self) -> None:
        compare = self._compare_panel()
        if compare is None or not hasattr(compare, "add_combination_variant"):
            self.message.show_message("the Compare panel cannot preview combinations in this version", "warn")
            return
        rows = self.checked_rows()
        if len(rows) < 2:
            self.message.show_message("tick two or more adapters to preview a combination", "warn")
            return
        combination = self.combo_type.currentText()
        density = round(self.density.value(), 4) if combination in NEEDS_DENSITY else None
        weights = {r.name: r.weight for r in rows}
        try:
            compare.add_combination_variant(self.variant_name(combination), weights, combination, density)
        except UserError as exc:
            self.message.show_message(str(exc), "error")
            return
        self._show_compare_tab()

    def compare_merged(self) -> None:
        compare = self._compare_panel()
        if self.result is None:
            return
        if compare is None or not hasattr(compare, "add_merged_variant"):
            self.message.show_message("the Compare panel cannot load a merged folder in this version", "warn")
            return
        try:
            compare.add_merged_variant(str(self.result.out))
        except UserError as exc:
            self.message.show_message(str(exc), "error")
            return
        self._show_compare_tab()
