"""The Merge tab: pick adapters (and weights), see what each engine would need, merge and save, verify; or
export the adapter as a GGUF file verified in llama.cpp, or as an mlx-lm adapter (or a PEFT one from it) verified in
mlx-lm (merge_export.py).

Everything heavy is the core's (core/merge/): ``plan_merge`` runs as a keyed read-only side job
whenever the inputs change (debounced), on the session's snapshot, never the model;
``merge_and_save`` as one exclusive model job through the window's JobRunner. The panel reads the
session only through the session model's snapshots. Previews go to the Compare tab through the
``compare`` collaborator it is given (merge_preview.py); the result box and saving a combination as an
adapter are merge_result.py's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QTimer, Signal
from PySide6.QtGui import QResizeEvent
from PySide6.QtWidgets import (
    QBoxLayout,
    QDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.errors import UserError
from lora_studio.core.export import GGUF_FORMATS, MLX_FORMATS, ExportPlan, ExportResult
from lora_studio.core.export.mlx import mlx_lm_version
from lora_studio.core.export.runtime import llama_cpp_version
from lora_studio.core.merge import (
    AdapterSpec,
    MergeOptions,
    MergePlan,
    MergeResult,
    merge_and_save,
    plan_merge,
)
from lora_studio.core.session import SessionState
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.ops import unique_name
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.base.widgets import wheel_scrolls_past_fields
from lora_studio.gui.tabs.merge import export as merge_export
from lora_studio.gui.tabs.merge.host import ComparePreview
from lora_studio.gui.tabs.merge.inputs import AdapterPicker, OutputBox, merge_request, use_scale
from lora_studio.gui.tabs.merge.parts import AdapterRow, PlanTable, RunRow, engine_note, start_reason
from lora_studio.gui.tabs.merge.preview import compare_merged, preview_in_compare
from lora_studio.gui.tabs.merge.result import (
    CardDialog,
    ResultBox,
    ask_adapter_folder,
    ask_overwrite,
    exported_lines,
    merged_lines,
    open_card,
    open_folder,
    save_as_adapter,
    show_card,
)

if TYPE_CHECKING:
    from lora_studio.core.model.sources import ModelSource
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.context import TabContext

PLAN_DEBOUNCE_MS = 300
SIDE_BY_SIDE_WIDTH = 820  # the adapters and the output box side by side from this tab width, else one above the other
PLAN_KEY = "merge-plan"


class MergePanel(Panel):
    model_saved = Signal(str)  # the folder a merged model was saved in: the local model list shows it

    def __init__(self, ctx: TabContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.compare: ComparePreview = ctx.navigator  # where previews go
        self.show_compare_tab: Callable[[], None] = ctx.navigator.show_compare_tab
        self.source: ModelSource | None = None  # the session's ModelSource, with the state
        self.plan: MergePlan | None = None
        self.export_plan: ExportPlan | None = None  # the plan when the format is a GGUF
        self.install_job: Job | None = None
        self.plan_error = ""
        self.plan_pending = False
        self._plan_seq = 0
        self.merge_job: Job | None = None
        self.result: MergeResult | ExportResult | None = None
        # Injectable for tests: answer the overwrite question, open a file or folder.
        self.confirm_overwrite: Callable[[Path], bool] = lambda path: ask_overwrite(self, path)
        self.ask_adapter_folder: Callable[[Path], Path | None] = lambda start: ask_adapter_folder(self, start)
        self.card_dialog: QDialog | None = None
        self.save_job: Job | None = None

        self._plan_timer = QTimer(self)
        self._plan_timer.setSingleShot(True)
        self._plan_timer.setInterval(PLAN_DEBOUNCE_MS)
        self._plan_timer.timeout.connect(self.refresh_plan)
        top = self._build_inputs()
        self._build_plan()
        run_row = self._build_run_row()
        self._build_result()
        self._build_layout(top, run_row)
        self.update_install_button()
        self.show_state(self.state)

    # -- construction ---------------------------------------------------------------------------------------------
    def _build_inputs(self) -> QHBoxLayout:
        """The adapters with their weights and combination, beside the output format and folder."""
        self.adapters = AdapterPicker()
        self.adapters.changed.connect(self.suggest_output)  # before the plan, which checks the output
        self.adapters.changed.connect(self.inputs_changed)
        self.adapters.preview_btn.clicked.connect(self.preview_in_compare)
        self.adapters.save_adapter_btn.clicked.connect(lambda: save_as_adapter(self))
        self.output = OutputBox()
        self.output.gguf_type_combo.currentIndexChanged.connect(lambda _index: self.suggest_output())
        self.output.changed.connect(self.inputs_changed)
        self.output.browse_btn.clicked.connect(self.browse_out)
        self.output.format_changed.connect(self._format_changed)
        self.output.install_btn.clicked.connect(self.install_runtime)
        top = self.inputs_row = QHBoxLayout()
        top.addWidget(self.adapters, 3)
        top.addWidget(self.output, 2)
        return top

    def _build_plan(self) -> None:
        """What a merge needs (the plan table), or what a GGUF export needs (one line)."""
        self.plan_table = PlanTable()
        self.export_plan_label = QLabel("")
        self.export_plan_label.setWordWrap(True)
        self.export_plan_label.hide()

    def _build_run_row(self) -> RunRow:
        self.run_row = RunRow(self.progress)
        self.run_row.merge_btn.clicked.connect(self.start_merge)
        self.run_row.cancel_btn.clicked.connect(self.cancel_merge)
        return self.run_row

    def _build_result(self) -> None:
        self.result_box = ResultBox()
        self.result_box.card_btn.clicked.connect(self.open_card)
        self.result_box.folder_btn.clicked.connect(self.open_folder)
        self.result_box.compare_merged_btn.clicked.connect(lambda: compare_merged(self))
        self.result_box.write_base_btn.clicked.connect(self.write_base_gguf)

    def _build_layout(self, top: QHBoxLayout, run_row: QWidget) -> None:
        # The tab scrolls rather than growing: a result box appearing must not take height from the Memory dock.
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        for widget in (self.plan_table, self.export_plan_label, run_row, self.result_box, self.message):
            layout.addWidget(widget)
        layout.addStretch(1)
        self.body_scroll = QScrollArea()
        self.body_scroll.setWidgetResizable(True)
        self.body_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.body_scroll.setWidget(body)
        self._wheel_guard = wheel_scrolls_past_fields(body)  # the wheel scrolls the tab, not the GPU size under it
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.body_scroll)

    def resizeEvent(self, event: QResizeEvent) -> None:
        # side by side the two boxes need ~800 pixels: a narrower tab (a 1000-pixel window) stacks them instead of
        # scrolling sideways
        super().resizeEvent(event)
        side_by_side = event.size().width() >= SIDE_BY_SIDE_WIDTH
        self.inputs_row.setDirection(
            QBoxLayout.Direction.LeftToRight if side_by_side else QBoxLayout.Direction.TopToBottom
        )

    # -- session state --------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        self.state, self.source = state, self.session_model.source
        self.output.follow_base(state.base_path, state.dtype)
        self.output.show_saved_quantised(bool(state.quantization) and state.quantize is None)
        self.adapters.show_adapters(state.adapters, state.active_adapter)
        self.suggest_output()
        self.inputs_changed()

    def forget_base(self) -> None:
        super().forget_base()
        self.result_box.hide()  # the last base's merge

    def suggest_output(self) -> None:
        """An output left empty or as suggested follows the base, the ticked adapters, the format and the type
        (a name of the last base's, or a .lora-f16 name for an f32 file, would say what the output is not); a
        name the user wrote stays, and so does a box the user emptied until the inputs change."""
        text = self.output.out_edit.text().strip()
        if text and text != self.output.suggested_out:
            return
        suggested = merge_export.suggested_path(self)
        self.output.suggested_out = str(suggested) if suggested is not None else None
        self.output.out_edit.setText(self.output.suggested_out or "")

    @property
    def rows(self) -> list[AdapterRow]:
        return self.adapters.rows

    # -- the request --------------------------------------------------------------------------------------------------
    def checked_rows(self) -> list[AdapterRow]:
        return self.adapters.checked_rows()

    def out_path(self) -> Path | None:
        return self.output.out_path()

    def is_export(self) -> bool:
        """A file or folder for a runtime (GGUF, mlx-lm), written by core/export, not a merged model folder."""
        return self.output.format() != "hf"

    def use_scale(self, adapter: str, scale: float) -> None:
        """Merge ``adapter`` alone at ``scale`` (what the Evaluate tab's scale sweep found best)."""
        if use_scale(self.adapters, adapter, scale):
            self.show_message(f"{adapter} ticked alone at scale {scale:g}: Merge writes it at that scale", "ok")
        else:
            self.show_message(f"{adapter} is not an adapter folder this tab can merge", "warn")

    def request(self, out: Path | None = None) -> tuple[list[AdapterSpec], MergeOptions]:
        """What the inputs ask for; raises UserError when they cannot make a merge."""
        return merge_request(self.adapters, self.output, out)

    def inputs_changed(self, *_args: object) -> None:
        self.adapters.update_enabled()
        # a new plan is due: Merge waits for it (the disk check must be current)
        self._plan_seq += 1
        self.plan_pending = True
        if self.runner.closed:
            return
        self._plan_timer.start()
        self.update_buttons()

    # -- the plan (a keyed read-only side job) ------------------------------------------------------------------------
    def refresh_plan(self) -> Job | None:
        self._plan_timer.stop()
        if self.runner.closed:
            return None
        seq = self._plan_seq
        state, source = self.state, self.source
        if not state.base or source is None:
            self.plan_done(seq, UserError("no base model is loaded", "load a base model first"))
            return None
        if self.is_export():
            return merge_export.refresh_export_plan(self, seq)
        try:
            specs, options = self.request()
        except UserError as exc:
            self.plan_done(seq, exc)
            return None

        # the snapshot, not the session: the plan reads its dtype, device and tokenizer only
        return self.run_plan(
            seq, "checking the merge", PLAN_KEY, lambda: plan_merge(source, specs, options, session=state)
        )

    def run_plan(self, seq: int, what: str, key: str, plan: Callable[[], MergePlan | ExportPlan]) -> Job | None:
        """``plan()`` as a keyed read-only side job; its result, or the UserError it raised, goes to _plan_done."""

        def run(session: Session, *, cancel: CancelToken, report: Report) -> MergePlan | ExportPlan:
            return plan()

        return (
            self.op(what, run, exclusive=False, key=key, progress=False)
            .on_success(lambda result: self.plan_done(seq, result))
            # bad inputs are a reason shown by the button, not a failed job in the log
            .on_refusal(UserError, lambda exc: self.plan_done(seq, exc))
            .on_failure(lambda desc: self.plan_done(seq, UserError(desc.message)))
            .on_cancel(lambda: None)
            .run()
        )

    def plan_done(self, seq: int, result: MergePlan | ExportPlan | UserError) -> None:
        if seq != self._plan_seq:
            return  # the inputs changed meanwhile: a newer plan is on its way
        self.plan_pending = False
        self.export_plan = None
        if isinstance(result, UserError):
            self.plan, self.plan_error = None, str(result)
        elif isinstance(result, ExportPlan):
            self.plan, self.export_plan, self.plan_error = None, result, ""
        else:
            self.plan, self.plan_error = result, ""
        gguf = self.is_export()
        self.plan_table.setVisible(not gguf)
        self.export_plan_label.setVisible(gguf and self.export_plan is not None)
        if self.export_plan is not None:
            self.export_plan_label.setText(merge_export.plan_text(self.export_plan))
        self.plan_table.show_plan(self.plan, self.out_path())
        self.output.engine_note.setText(
            ""
            if self.plan is None
            else engine_note(self.plan, self.output.engine() is not None, self.output.safe_check.isChecked())
        )
        self.update_buttons()

    # -- buttons --------------------------------------------------------------------------------------------------
    def start_reason(self) -> str:
        """'' when Merge may start; otherwise why not (shown beside the button)."""
        return start_reason(
            busy=self.busy_reason,
            has_base=bool(self.state.base),
            output_format=self.output.format(),
            attached=len(self.rows),
            ticked=len(self.checked_rows()),
            plan_error=self.plan_error,
            plan_pending=self.plan_pending,
            has_out=self.out_path() is not None,
            plan=self.plan,
        )

    def update_buttons(self) -> None:
        reason = self.start_reason()
        running = self.merge_job is not None and not self.merge_job.done
        actions = {
            "hf": "merge the ticked adapter(s) into the base and save the folder",
            "mlx": "write the adapter for mlx-lm and run it in mlx-lm against the adapter in PEFT",
            "peft": "write the adapter attached from mlx-lm as a PEFT folder, checked in mlx-lm",
        }
        action = actions.get(
            self.output.format(),
            "write the GGUF, run it in llama.cpp against the adapter, and write its serving bundle",
        )
        self.set_reasons({self.run_row.merge_btn: (reason, action)})
        # a combination's refusal is already shown beside its type: one line, not two (the tooltip keeps it)
        shown_above = bool(self.adapters.refusal_text) and self.adapters.refusal_text in reason
        self.run_row.reason_label.setText("" if running else reason)
        self.run_row.reason_label.setVisible(not running and bool(reason) and not shown_above)
        self.run_row.cancel_btn.setEnabled(running)
        busy = self.busy_reason
        if len(self.checked_rows()) > 1:
            preview_reason = busy or self.plan_error
        else:
            preview_reason = "tick two or more adapters to preview their combination"
        compare_reason = busy or ("" if self.result is not None else "no merged folder yet")
        if self.result is not None and isinstance(self.result, ExportResult):
            compare_reason = "load the GGUF in llama.cpp to compare it (the Compare tab runs transformers models)"
        self.set_reasons(
            {
                self.adapters.preview_btn: (
                    preview_reason,
                    "add this weighted combination as a variant in the Compare tab",
                ),
                self.adapters.save_adapter_btn: (
                    (busy or self.plan_error) if len(self.checked_rows()) > 1 else "tick two or more adapters",
                    "save this weighted combination as a PEFT adapter folder, without merging it into the base",
                ),
                self.result_box.compare_merged_btn: (
                    compare_reason,
                    "load the saved folder beside the session and compare it with the adapter",
                ),
            }
        )

    def browse_out(self) -> None:
        base_folder = Path(self.state.base_path).parent if self.state.base_path else Path.home()
        self.output.browse(base_folder, merge_export.suggested_path(self) if self.is_export() else None)

    def _format_changed(self) -> None:
        """A GGUF wants a .gguf file name, a folder format a folder: suggest a name that says what it holds when the
        box has the other kind."""
        fmt = self.output.format()
        gguf = fmt in GGUF_FORMATS
        labels = {"hf": "Merge && save", "mlx": "Export for mlx-lm", "peft": "Save as PEFT"}
        self.run_row.merge_btn.setText(labels.get(fmt, "Export GGUF"))
        self.plan_table.setVisible(fmt == "hf")  # the other format's plan is not this one's: hidden until it comes
        self.export_plan_label.hide()
        text = self.output.out_edit.text().strip()
        if text and text != self.output.suggested_out and gguf != text.lower().endswith(".gguf"):
            self.output.out_edit.setText("")  # the user's name for the other format: this one gets its own
        self.suggest_output()
        self.update_install_button()

    def update_install_button(self) -> None:
        fmt = self.output.format()
        mlx = fmt in MLX_FORMATS  # checked in mlx-lm; without it the folder is written unchecked
        missing = (mlx_lm_version() if mlx else llama_cpp_version()) is None
        button = self.output.install_btn
        if self.install_job is None:  # a running install keeps its own label
            button.setText("Install mlx-lm…" if mlx else "Install llama.cpp…")
        button.setVisible(fmt != "hf" and (missing or self.install_job is not None))

    def install_runtime(self) -> Job | None:
        """Install the chosen format's runtime in the background: llama.cpp's binding (built from source) or
        mlx-lm (merge_export.install)."""
        return merge_export.install(self)

    # -- merge --------------------------------------------------------------------------------------------------------
    def start_merge(self) -> Job | None:
        """Start the merge job (after confirming an overwrite); returns the Job, or None when it did not start."""
        reason = self.start_reason()
        if reason:
            self.show_message(reason, "warn")
            return None
        out = self.out_path()
        if out is None:  # start_reason() said so already
            return None
        if self.is_export():
            return self._track(merge_export.start_export(self, out))
        try:
            specs, options = self.request(out)
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        if out.is_dir() and any(out.iterdir()):
            if not self.confirm_overwrite(out):
                self.show_message(f"kept {out} as it is; nothing was written", "info")
                return None
            options = dataclasses.replace(options, overwrite=True)
        elif out.is_dir():
            options = dataclasses.replace(options, overwrite=True)  # an empty folder: nothing to lose
        source = self.source
        if source is None:  # start_reason() said so already
            return None

        def run(session: Session, *, cancel: CancelToken, report: Report) -> MergeResult:
            return merge_and_save(source, specs, options, session=session, cancel=cancel, report=report)

        what = specs[0].name if len(specs) == 1 else f"{options.combination} of {len(specs)} adapters"
        job = (
            self.op(f"merging {what} into {out.name}", run)
            .on_end(self.end_merge)
            .on_success(self._merged)
            .on_cancel(
                lambda: self.show_message(
                    "merge cancelled; no output folder was written (an existing one is unchanged)", "warn"
                )
            )
            .run(f"merging {what} into {out}…")
        )
        return self._track(job)

    def _track(self, job: Job | None) -> Job | None:
        """The merge or export job that started: Cancel acts on it; the last result is cleared."""
        if job is None:
            return None
        self.merge_job = job
        self.result = None
        self.result_box.hide()
        self.update_buttons()
        return job

    def write_base_gguf(self) -> Job | None:
        """The base GGUF an adapter-only result's serving commands name, written alone (f16)."""
        out = self.result.base_to_write if isinstance(self.result, ExportResult) else None
        if out is None:
            return None

        def written(result: ExportResult) -> None:
            if isinstance(self.result, ExportResult):
                self.result_box.show_export(self.result)  # its commands without the one that wrote the base
            self.result_box.write_base_btn.hide()
            said = {
                "pass": " (verified in llama.cpp)",
                "warn": " (⚠ llama.cpp differs a little)",
                "fail": " (✖ llama.cpp disagrees with transformers: see the Log)",
            }.get(result.verification.status, "")
            self.show_saved(f"the base GGUF{said}", result.out)
            QTimer.singleShot(0, lambda: self.body_scroll.ensureWidgetVisible(self.message))  # under the result

        job = merge_export.write_base(self, out, written)
        if job is not None:
            self.merge_job = job  # Cancel acts on it
            self.update_buttons()
        return job

    def cancel_merge(self) -> None:
        self.cancel_job(self.merge_job)

    def end_merge(self) -> None:
        self.merge_job = None

    def _merged(self, result: MergeResult) -> None:
        self._show_outcome(result, *merged_lines(result), marker="merged")

    def exported(self, result: ExportResult) -> None:
        self._show_outcome(result, *exported_lines(result), marker="exported")

    def _show_outcome(self, result: MergeResult | ExportResult, message: str, kind: str, log: str, marker: str) -> None:
        self.result = result
        if isinstance(result, MergeResult):
            self.result_box.show_result(result)
        else:
            self.result_box.show_export(result)
        # once laid out, scroll so the verdict and its buttons are in view
        QTimer.singleShot(0, lambda: self.body_scroll.ensureWidgetVisible(self.result_box, 0, 0))
        self.show_message(message, kind)
        if isinstance(result, MergeResult) or result.format == "gguf":  # a model to load, not an adapter-only file
            self.model_saved.emit(str(Path(result.out).parent))
        self.suggest_output()  # a suggested output now names what was just written: the next one moves on
        self.marker.emit(marker)
        self.log_line.emit(log, "info" if kind == "ok" else "warn")

    # -- the result and saving the combination as an adapter (merge_result.py) ------------------------------------
    def open_card(self) -> None:
        open_card(self)

    def show_card(self, card: Path) -> CardDialog:
        return show_card(self, card, self)

    def open_folder(self) -> None:
        open_folder(self)

    # -- the Compare tab ----------------------------------------------------------------------------------------------
    def variant_name(self, combination: str) -> str:
        return unique_name(f"mix-{combination}", (a[0] for a in self.state.adapters))

    def preview_in_compare(self) -> None:
        """Add the ticked adapters' weighted combination as a Compare column (see merge_preview.py)."""
        preview_in_compare(self)
