"""The Train tab: data, settings and a live view of a LoRA / OLoRA / PiSSA run on the loaded base.

The run is one model job (:func:`lora_studio.core.train.train_adapter`) through the window's runner. Its
metrics arrive on the worker thread and the chart (chart.py) draws them: the loss curves, learning rate,
tokens/s, elapsed and ETA, and the overfitting warning. Stop ends after the current step with a checkpoint;
Resume continues from it. The trained adapter is attached to the session when the run ends, so Adapters,
Compare and Merge see it; the result (results.py) may offer the other weights instead. The data's preview and
the memory estimate are in preview.py, the file rows in files.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import QFileDialog, QFrame, QHBoxLayout, QPushButton, QScrollArea, QVBoxLayout, QWidget

from lora_studio.core.errors import UserError
from lora_studio.core.session import SessionState
from lora_studio.core.train import TrainResult, TrainSettings
from lora_studio.core.train.records import checkpoints_beside
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.base.widgets import ask_yes_no, side_by_side
from lora_studio.gui.tabs.train.chart import TrainChart
from lora_studio.gui.tabs.train.files import DataFiles, default_out_parent
from lora_studio.gui.tabs.train.form import TrainSettingsForm
from lora_studio.gui.tabs.train.preview import DataPreview
from lora_studio.gui.tabs.train.results import ResultSummary

if TYPE_CHECKING:
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.core.train.script import ExportedScript
    from lora_studio.gui.base.context import TabContext

ATTACH_DELAY_MS = 150  # from a run's end to the attach of its adapter
RESULTS_MIN_HEIGHT = 420  # the estimate, the chart, its lines and the result without overlap; less scrolls


class TrainPanel(Panel):
    def __init__(self, ctx: TabContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.attach: Callable[[str], object] = ctx.navigator.attach_adapter
        self.job: Job | None = None
        self.last_checkpoint: Path | None = None
        self.checkpoints: Path | None = None  # the running (or last) run's checkpoint folder
        self.trained_on = ""  # the base folder of the running (or last) run
        self._quantize_followed: tuple[str | None, str | None] | None = None  # the load Quantize base last followed
        self._attach_when_free: str | None = None  # a trained adapter waiting for the model job that runs
        self.confirm_replace: Callable[[Path], bool] = self._ask_replace  # tests answer it
        left = self._build_inputs()
        buttons = self._build_buttons()
        right = self._build_results()
        self._build_layout(left, right, buttons)
        self._connect()
        self.update_buttons()

    # -- build steps ---------------------------------------------------------------------------------------------------
    def _build_inputs(self) -> QScrollArea:
        """The files and the settings form, in a scroll area."""
        self.form = TrainSettingsForm()
        self.files = DataFiles(self, self.form)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.addWidget(self.files)
        left_layout.addWidget(self.form)
        left_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(left)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(300)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        # with the bar off, a focused field beyond the right edge still scrolled the pane sideways and cut the
        # labels ("ata", "ave to"): the pane stays at its left edge
        bar = scroll.horizontalScrollBar()
        bar.valueChanged.connect(lambda value: bar.setValue(0) if value else None)
        return scroll

    def _build_buttons(self) -> QHBoxLayout:
        self.preview_btn = QPushButton("Preview data")
        self.start_btn = QPushButton("Train")
        self.start_btn.setDefault(True)
        self.stop_btn = QPushButton("Stop")
        self.resume_btn = QPushButton("Resume…")
        self.export_btn = QPushButton("Export as script…")
        buttons = QHBoxLayout()
        for b in (self.preview_btn, self.start_btn, self.stop_btn, self.resume_btn, self.export_btn):
            buttons.addWidget(b)
        return buttons

    def _build_results(self) -> QWidget:
        """The estimate, the chart and its lines, the result, the preview of the data."""
        self.data_preview = DataPreview(self, self)
        self.chart = TrainChart(self)
        self.summary = ResultSummary(self)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.addWidget(self.data_preview.estimate_label)
        right_layout.addLayout(self.chart.holder, 3)
        right_layout.addWidget(self.chart.stats_label)
        right_layout.addWidget(self.chart.warning_label)
        right_layout.addWidget(self.summary.summary_label)
        right_layout.addWidget(self.summary.swap_btn, 0, Qt.AlignmentFlag.AlignLeft)
        right_layout.addWidget(self.data_preview.preview_view, 2)
        # scrolled when the column is short (1280 x 720 after a run): the result lines never slide under the chart
        scroll = QScrollArea()
        scroll.setWidget(right)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        right.setMinimumHeight(RESULTS_MIN_HEIGHT)
        return scroll

    def _build_layout(self, left: QWidget, right: QWidget, buttons: QHBoxLayout) -> None:
        splitter = side_by_side(left, right, (340, 600))
        layout = QVBoxLayout(self)
        layout.addWidget(splitter, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        self.progress.hide()
        layout.addWidget(self.message)

    def _connect(self) -> None:
        self.form.changed.connect(self._settings_changed)
        self.preview_btn.clicked.connect(self.preview)
        self.start_btn.clicked.connect(lambda: self.start())
        self.stop_btn.clicked.connect(self.stop)
        self.resume_btn.clicked.connect(self.resume)
        self.export_btn.clicked.connect(self.export_script)
        self.files.data_edit.textChanged.connect(self._data_changed)

    # -- inputs --------------------------------------------------------------------------------------------------------
    def _suggested_out(self, parent: Path) -> Path:
        """``parent/<data>-<init>-r<r>``, numbered past the folders earlier runs left there."""
        return self.files.suggested_out(parent)

    def _data_changed(self, _text: str) -> None:
        self.data_preview.longest_row = None
        self.files.follow_data()
        self._settings_changed()

    def _settings_changed(self) -> None:
        if not self.running:
            self.files.follow_data()  # a suggested name follows the rank and init it names
        self.data_preview.estimate_soon()
        self.update_buttons()

    def inputs(self) -> tuple[str, Path, Path | None, TrainSettings]:
        """The base's folder, the data, the validation data (or None) and the settings, as they are now."""
        base = self.state.base_path or ""
        val = self.files.val_edit.text().strip()
        return base, Path(self.files.data_edit.text().strip()), Path(val) if val else None, self.form.settings()

    def prefill_demo(self) -> None:
        """The demo's pirate dataset and a rank-8 OLoRA run that trains in a few minutes on a CPU."""
        from lora_studio.core.demo.assets import demo_dir

        data = demo_dir() / "data"
        if not (data / "pirate.train.jsonl").is_file() or self.files.data_edit.text():
            return
        self.form.set_settings(
            TrainSettings(r=8, alpha=16.0, init="olora", max_steps=60, learning_rate=1e-3, eval_steps=10)
        )
        self.files.val_edit.setText(str(data / "pirate.val.jsonl"))
        self.files.data_edit.setText(str(data / "pirate.train.jsonl"))

    # -- state ---------------------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        super().show_state(state)
        on_gpu = state.device and (state.device.startswith("cuda") or state.device == "mps")
        self.form.set_devices(["cpu"] + ([state.device] if on_gpu and state.device else []))
        # a base loaded quantised is what the user means to train on (QLoRA): the choice follows each new load,
        # and stays the user's between loads
        loaded = (state.base_path, state.quantize)
        if state.base_path and loaded != self._quantize_followed:
            self._quantize_followed = loaded
            self.form.follow_quantize(state.quantize)
            if not self.running:
                self.files.advance()
        self.data_preview.estimate_soon()
        self.update_buttons()

    def forget_base(self) -> None:
        """The last base's run (its curves, its result and the offer of its other weights) is not this base's; a
        run still going on keeps its own."""
        if self.running:
            return
        super().forget_base()
        self.summary.clear()
        self.chart.begin_run(fresh=True, baseline=False)

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done

    @property
    def result(self) -> TrainResult | None:
        """The last run's result (None while one runs, or before the first ends)."""
        return self.summary.result

    @property
    def series(self) -> dict[str, tuple[list[float], list[float]]]:
        """The chart's curves: "lora:train" -> (steps, losses)."""
        return self.chart.series

    @property
    def plot(self) -> Any:
        """The chart (None before it is first shown or drawn)."""
        return self.chart.plot

    def start_reason(self) -> str:
        if self.running:
            return "a training run is going on (Stop ends it after the current step)"
        if not self.state.loaded:
            return "load a base model first (training uses its folder)"
        if not self.files.data_edit.text().strip():
            return "choose a training data file"
        if not self.files.out_edit.text().strip():
            return "choose where to save the adapter"
        return self.busy_reason

    def update_buttons(self) -> None:
        reason = self.start_reason()
        data_reason = "" if self.state.loaded and self.files.data_edit.text().strip() else "load a base and choose data"
        self.set_reasons(
            {
                self.start_btn: (reason, "train an adapter on the loaded base with these settings"),
                self.resume_btn: (
                    reason,
                    "continue a stopped run from its last checkpoint"
                    if self.last_checkpoint
                    else "continue from a checkpoint-N folder",
                ),
                self.preview_btn: (
                    data_reason,
                    "show the first rows as the model will see them (the part without loss greyed)",
                ),
            }
        )
        self.stop_btn.setEnabled(self.running)
        self.set_reasons(
            {
                self.export_btn: (
                    data_reason,
                    "write a standalone training script and accelerate configs (DDP over several GPUs, FSDP) "
                    "that run this job on another machine",
                )
            }
        )

    # -- preview and estimate (preview.py) -----------------------------------------------------------------------------
    def preview(self) -> None:
        """The first rows of the data as the model sees them (a side job)."""
        self.data_preview.preview()

    def refresh_estimate(self) -> None:
        self.data_preview.refresh_estimate()

    # -- the run -------------------------------------------------------------------------------------------------------
    def start(self, resume: Path | None = None) -> Job | None:
        base, data, val, settings = self.inputs()
        out = Path(self.files.out_edit.text().strip()).expanduser()
        try:
            settings.check()
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        overwrite = resume is not None and out.exists()
        if resume is None and out.exists():
            if not self.confirm_replace(out):
                self.show_message(f"{out.name} exists: choose another folder to save to", "warn")
                return None
            overwrite = True
        chart = self.chart

        def run(session: Session, *, cancel: CancelToken, report: Report) -> TrainResult:
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train import TrainRequest, train_in_worker_process

            request = TrainRequest(resolve_source(base), data, out, settings, val, resume=resume, overwrite=overwrite)
            return train_in_worker_process(request, cancel=cancel, report=report, on_metrics=chart.queue)

        # the run is a process of its own: where memory holds a second copy of the model, the window's other work
        # goes on beside it; where it does not, the window waits (a compare beside it could exhaust the memory)
        beside = self.data_preview.room_beside_the_session()
        chart.begin_run(fresh=resume is None, baseline=settings.baseline)
        self.summary.clear()
        self.checkpoints = resume.parent if resume else checkpoints_beside(out)
        self.trained_on = base
        what = f"training {out.name}" if resume is None else f"resuming from {resume.name}"
        self.job = (
            self.op("training", run, exclusive=not beside)
            .on_success(self._trained)
            .on_cancel(self._stopped)
            .on_end(self._run_ended)
            .run(
                f"{what}… — the rest of the window stays usable"
                if beside
                else f"{what}… — the window waits for it: the memory free holds no second copy of the model"
                " beside the loaded one (see the estimate)"
            )
        )
        if self.job is not None:
            chart.start()
            self.marker.emit(f"training {out.name}")
        self.update_buttons()
        return self.job

    def _ask_replace(self, out: Path) -> bool:
        return ask_yes_no(
            self,
            "Replace the adapter folder?",
            f"{out} exists.\n\nReplace it with this run's adapter? It is replaced when the run ends; until then, "
            "and if the run fails or is stopped, it stays as it is.",
        )

    def _run_ended(self) -> None:
        self.chart.stop()
        self.files.advance()  # the folder just written is taken: the next run gets the next name

    def stop(self) -> None:
        self.cancel_job(self.job, "stopping after this step (a checkpoint is written)…")

    def resume(self) -> None:
        checkpoint = self.last_checkpoint
        if checkpoint is None or not checkpoint.is_dir():
            start = self.start_folder("train-out", str(default_out_parent()))
            chosen = QFileDialog.getExistingDirectory(self, "Resume from a checkpoint-N folder", start)
            if not chosen:
                return
            checkpoint = Path(chosen)
        self.start(resume=checkpoint)

    def export_script(self, folder: str | None = None) -> Job | None:
        base, data, val, settings = self.inputs()
        out = Path(self.files.out_edit.text().strip() or "adapter").expanduser()
        if folder is None:
            start = self.start_folder("train-out", str(default_out_parent()))
            chosen = QFileDialog.getExistingDirectory(self, "Write the training script into", start)
            if not chosen:
                return None
            self.remember_folder("train-out", chosen)
            folder = str(Path(chosen) / f"{out.name}-job")
        into = Path(folder)

        def run(session: Session, *, cancel: CancelToken, report: Report) -> ExportedScript:
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train import TrainRequest
            from lora_studio.core.train.script import export_script

            return export_script(TrainRequest(resolve_source(base), data, out, settings, val), into)

        def done(exported: ExportedScript) -> None:
            self.show_message(
                f"wrote {exported.script} — run it with: accelerate launch --config_file "
                f"{exported.configs[0].name} {exported.script.name}",
                "ok",
            )

        return self.op("exporting the training script", run, exclusive=False, key="train-export").on_success(done).run()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self.chart.ensure_plot()  # the empty chart, axes and legend, before the first point

    def draw(self) -> None:
        """Draw the metrics queued since the last tick."""
        self.chart.draw()

    def _stopped(self) -> None:
        folder = self.checkpoints
        checkpoints = sorted(
            (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()) if folder else (),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        self.last_checkpoint = checkpoints[-1] if checkpoints else None
        where = f"; Resume continues from {self.last_checkpoint.name}" if self.last_checkpoint else ""
        self.show_message(f"training stopped{where}", "warn")
        self.marker.emit("training stopped")

    def _trained(self, result: TrainResult) -> None:
        self.last_checkpoint = None
        self.summary.show(result)
        self.marker.emit("training finished")
        if self.state.base_path != self.trained_on:  # another base was loaded while the run went on
            self.show_message(f"trained {result.adapter}; load its base {self.trained_on} to attach it", "ok")
            return
        self.show_message(f"trained {result.adapter.name}; it is attached to the session (see Adapters)", "ok")
        path = str(result.adapter)
        # a moment later, in a turn of its own: the result's table and the chart's last draw repaint the tab first
        # (in the same turn as the attach job's start, the window stalled 60-70 ms on a 2-core machine)
        QTimer.singleShot(ATTACH_DELAY_MS, self, lambda: self._attach_trained(path))  # dropped if the panel goes

    def _attach_trained(self, path: str) -> None:
        if self.busy_reason:  # a compare or an evaluation beside the run: the attach follows it
            self._attach_when_free = path
            self.show_message(f"trained {Path(path).name}; it is attached when the running job ends", "ok")
            return
        self.attach(path)

    def _busy_changed(self, reason: str) -> None:
        super()._busy_changed(reason)
        if not reason and self._attach_when_free is not None:
            path, self._attach_when_free = self._attach_when_free, None
            self._attach_trained(path)

    def use_alternative(self) -> Job | None:
        """The end-of-run choice: the adapter folder gets the other weights (best or last), attached anew."""
        return self.summary.use_alternative()
