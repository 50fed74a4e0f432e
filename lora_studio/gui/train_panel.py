"""The Train tab: data, settings and a live view of a LoRA / OLoRA / PiSSA run on the loaded base.

The run is one model job (:func:`lora_studio.core.train.train_adapter`) through the window's runner. Its
metrics arrive on the worker thread, are queued, and a 5 Hz timer draws them: the training and validation
loss curves (and the full fine-tuning baseline's), learning rate, tokens/s, elapsed and ETA, and the
overfitting warning. Stop ends after the current step with a checkpoint; Resume continues from it. The
trained adapter is attached to the session when the run ends, so Adapters, Compare and Merge see it.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.errors import UserError
from lora_studio.core.io.paths import data_dir
from lora_studio.core.session import SessionState
from lora_studio.core.train import PreviewRow, TrainMetrics, TrainResult, TrainSettings
from lora_studio.gui.jobs import Job, JobRunner
from lora_studio.gui.panel import Panel
from lora_studio.gui.session_model import SessionModel
from lora_studio.gui.train_settings import TrainSettingsForm
from lora_studio.gui.widgets import ElidedLabel, line_chart

DRAW_INTERVAL_MS = 200
DATA_FILTER = "Training data (*.jsonl *.json *.csv *.parquet);;All files (*)"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def preview_html(rows: list[PreviewRow]) -> str:
    """The rows as the model sees them: the part without loss greyed, the answer in black."""
    out = []
    for row in rows:
        text = "".join(
            f'<span style="color:{"#000" if loss else "#999"}">{html.escape(piece)}</span>'
            for piece, loss in row.pieces
        )
        cut = " · cut at max length" if row.truncated else ""
        out.append(
            f"<p><b>row {row.row}</b> · {row.tokens} tokens{cut}<br><tt>{text.replace(chr(10), '<br>')}</tt></p>"
        )
    return "".join(out) or "<i>no rows</i>"


ATTACH_DELAY_MS = 150  # from a run's end to the attach of its adapter


class TrainPanel(Panel):
    def __init__(
        self,
        runner: JobRunner,
        session_model: SessionModel,
        *,
        attach: Callable[[str], Any],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(runner, session_model, parent)
        self.attach = attach
        self.job: Job | None = None
        self.result: TrainResult | None = None
        self.last_checkpoint: Path | None = None
        self.checkpoints: Path | None = None  # the running (or last) run's checkpoint folder
        self.longest_row: int | None = None
        self._queue: list[TrainMetrics] = []
        self._lock = threading.Lock()
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self.plot: Any = None
        self._curves: dict[str, Any] = {}
        self._x_span = 0  # the last step the x axis was set to reach
        self._last_train_point: TrainMetrics | None = None

        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("training data: .jsonl, .csv, .parquet or a save_to_disk folder")
        self.val_edit = QLineEdit()
        self.val_edit.setPlaceholderText("validation data (optional: else a share of the training rows is held out)")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("adapter folder to write")
        files = QFormLayout()
        files.addRow("Data", self._with_browse(self.data_edit, self._browse_data))
        files.addRow("Validation", self._with_browse(self.val_edit, self._browse_val))
        files.addRow("Save to", self._with_browse(self.out_edit, self._browse_out))
        self.form = TrainSettingsForm()
        self.form.changed.connect(self._settings_changed)
        self.preview_btn = QPushButton("Preview data")
        self.preview_btn.clicked.connect(self.preview)
        self.start_btn = QPushButton("Train")
        self.start_btn.setDefault(True)
        self.start_btn.clicked.connect(lambda: self.start())
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.clicked.connect(self.stop)
        self.resume_btn = QPushButton("Resume…")
        self.resume_btn.clicked.connect(self.resume)
        self.export_btn = QPushButton("Export as script…")
        self.export_btn.clicked.connect(self.export_script)
        buttons = QHBoxLayout()
        for b in (self.preview_btn, self.start_btn, self.stop_btn, self.resume_btn, self.export_btn):
            buttons.addWidget(b)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.addLayout(files)
        left_layout.addWidget(self.form)
        left_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(left)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(300)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

        self.estimate_label = QLabel("")
        self.estimate_label.setWordWrap(True)
        self.stats_label = ElidedLabel("")
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet("color: #b35c00;")
        self.warning_label.hide()
        self.plot_holder = QVBoxLayout()
        self.preview_view = QTextBrowser()
        self.preview_view.setPlaceholderText("Preview data shows the first rows as the model will see them.")
        self.preview_view.setMinimumHeight(60)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # at the end of a run whose best and last weights differ: keep the other ones instead
        self.swap_btn = QPushButton("")
        self.swap_btn.clicked.connect(self.use_alternative)
        self.swap_btn.hide()
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.addWidget(self.estimate_label)
        right_layout.addLayout(self.plot_holder, 3)
        right_layout.addWidget(self.stats_label)
        right_layout.addWidget(self.warning_label)
        right_layout.addWidget(self.summary_label)
        right_layout.addWidget(self.swap_btn, 0, Qt.AlignmentFlag.AlignLeft)
        right_layout.addWidget(self.preview_view, 2)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(scroll)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([340, 600])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        self.progress.hide()
        layout.addWidget(self.message)

        self._draw_timer = QTimer(self)
        self._draw_timer.setInterval(DRAW_INTERVAL_MS)
        self._draw_timer.timeout.connect(self.draw)
        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(400)
        self._estimate_timer.timeout.connect(self.refresh_estimate)
        self.data_edit.textChanged.connect(self._data_changed)
        self.update_buttons()

    # -- layout helpers ------------------------------------------------------------------------------------------------
    def _with_browse(self, edit: QLineEdit, browse: Callable[[], None]) -> QWidget:
        row = QWidget()
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(edit, 1)
        button = QPushButton("…")
        button.setFixedWidth(32)
        button.setToolTip("browse")
        button.clicked.connect(browse)
        h.addWidget(button)
        return row

    def _browse_file(self, edit: QLineEdit) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training data", self.start_folder("train-data"), DATA_FILTER)
        if path:
            self.remember_folder("train-data", str(Path(path).parent))
            edit.setText(path)

    def _browse_data(self) -> None:
        self._browse_file(self.data_edit)

    def _browse_val(self) -> None:
        self._browse_file(self.val_edit)

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the adapter in", self.start_folder("train-out"))
        if folder:
            self.remember_folder("train-out", folder)
            self.out_edit.setText(str(self._suggested_out(Path(folder))))

    def _suggested_out(self, parent: Path) -> Path:
        """``parent/<data>-<init>-r<r>``, numbered past the folders an earlier run left there (a run refuses to
        replace one)."""
        stem = Path(self.data_edit.text()).stem.split(".")[0] or "adapter"
        init = self.form.init.currentData()
        name = f"{stem}-{init}-r{self.form.r.value()}" if init != "default" else f"{stem}-r{self.form.r.value()}"
        out, n = parent / name, 2
        while out.exists() or out.with_name(f"{out.name}.checkpoints").exists():
            out, n = parent / f"{name}-{n}", n + 1
        return out

    def _data_changed(self, _text: str) -> None:
        self.longest_row = None
        default_parent = data_dir() / "trained"
        current = self.out_edit.text()
        if not current or Path(current).parent == default_parent:
            self.out_edit.setText(str(self._suggested_out(default_parent)))
        self._settings_changed()

    def _settings_changed(self) -> None:
        self._estimate_timer.start()
        self.update_buttons()

    def prefill_demo(self) -> None:
        """The demo's pirate dataset and a rank-8 OLoRA run that trains in a few minutes on a CPU."""
        from lora_studio.core.demo.assets import demo_dir

        data = demo_dir() / "data"
        if not (data / "pirate.train.jsonl").is_file() or self.data_edit.text():
            return
        self.form.set_settings(
            TrainSettings(r=8, alpha=16.0, init="olora", max_steps=60, learning_rate=1e-3, eval_steps=10)
        )
        self.val_edit.setText(str(data / "pirate.val.jsonl"))
        self.data_edit.setText(str(data / "pirate.train.jsonl"))

    # -- state ---------------------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        super().show_state(state)
        self.form.set_devices(["cpu"] + ([state.device] if state.device and state.device.startswith("cuda") else []))
        self._estimate_timer.start()
        self.update_buttons()

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done

    def start_reason(self) -> str:
        if not self.state.loaded:
            return "load a base model first (training uses its folder)"
        if not self.data_edit.text().strip():
            return "choose a training data file"
        if not self.out_edit.text().strip():
            return "choose where to save the adapter"
        return self.busy_reason

    def update_buttons(self) -> None:
        reason = self.start_reason()
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
                    "" if self.state.loaded and self.data_edit.text().strip() else "load a base and choose data",
                    "show the first rows as the model will see them (the part without loss greyed)",
                ),
            }
        )
        self.stop_btn.setEnabled(self.running)
        export_reason = "" if self.state.loaded and self.data_edit.text().strip() else "load a base and choose data"
        self.set_reasons(
            {
                self.export_btn: (
                    export_reason,
                    "write a standalone training script and accelerate configs (DDP over several GPUs, FSDP) "
                    "that run this job on another machine",
                )
            }
        )

    # -- preview and estimate (side jobs) ---------------------------------------------------------------------------
    def _inputs(self) -> tuple[str, Path, Path | None, TrainSettings]:
        base = self.state.base_path or ""
        val = self.val_edit.text().strip()
        return base, Path(self.data_edit.text().strip()), Path(val) if val else None, self.form.settings()

    def preview(self) -> None:
        base, data, val, settings = self._inputs()

        def run(*, cancel, report):
            from lora_studio.core.model.loading import load_tokenizer
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train import preview
            from lora_studio.core.train.data import prepare_as_set

            tokenizer = load_tokenizer(resolve_source(base))
            prepared = prepare_as_set(settings, data, tokenizer, val, cancel=cancel, report=report)
            return prepared, preview(prepared.train, tokenizer, max_length=settings.max_length)

        def done(result) -> None:
            prepared, rows = result
            self.longest_row = max(len(e.input_ids) for e in prepared.train + prepared.val)
            self.preview_view.setHtml(preview_html(rows))
            note = "; ".join(prepared.warnings)
            self.show_message(prepared.summary() + (f" — {note}" if note else ""), "warn" if note else "ok")
            self.refresh_estimate()

        self.op("reading the data", run, exclusive=False, key="train-preview").on_success(done).run()

    def refresh_estimate(self) -> None:
        if not self.state.loaded:
            self.estimate_label.setText("")
            return
        base, _data, _val, settings = self._inputs()
        longest = self.longest_row

        def run(*, cancel, report):
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train.estimate import training_memory

            return training_memory(resolve_source(base), settings, longest_row=longest)

        def done(memory) -> None:
            mark = "✔" if memory.verdict == "fits" else "✖"
            basis = f"rows up to {longest} tokens" if longest else f"rows of {settings.max_length} tokens"
            self.estimate_label.setText(f"{mark} {memory.summary()} ({basis}; {memory.explanation})")

        def failed(_desc) -> None:
            self.estimate_label.setText("")

        (
            self.op("estimating memory", run, exclusive=False, key="train-estimate", progress=False)
            .on_success(done)
            .on_failure(failed)
            .run()
        )

    # -- the run -------------------------------------------------------------------------------------------------------
    def start(self, resume: Path | None = None) -> Job | None:
        base, data, val, settings = self._inputs()
        out = Path(self.out_edit.text().strip()).expanduser()
        try:
            settings.check()
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        overwrite = resume is not None and out.exists()

        def run(*, cancel, report):
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train import TrainRequest, train_in_worker_process

            request = TrainRequest(resolve_source(base), data, out, settings, val, resume=resume, overwrite=overwrite)
            return train_in_worker_process(request, cancel=cancel, report=report, on_metrics=self._queue_metrics)

        if resume is None:
            self.series.clear()
            self._clear_curves()
            self._last_train_point = None
            self._x_span = 0
        self._list_baseline(settings.baseline)
        self.result = None
        self.summary_label.setText("")
        self.swap_btn.hide()
        self.warning_label.hide()
        self.checkpoints = resume.parent if resume else out.parent / f"{out.name}.checkpoints"
        self.job = (
            self.op("training", run)
            .on_success(self._trained)
            .on_cancel(self._stopped)
            .on_end(self._ended)
            .run(f"training {out.name}…" if resume is None else f"resuming from {resume.name}…")
        )
        if self.job is not None:
            self._draw_timer.start()
            self.marker.emit(f"training {out.name}")
        self.update_buttons()
        return self.job

    def stop(self) -> None:
        self.cancel_job(self.job, "stopping after this step (a checkpoint is written)…")

    def resume(self) -> None:
        checkpoint = self.last_checkpoint
        if checkpoint is None or not checkpoint.is_dir():
            start = self.start_folder("train-out", str(data_dir() / "trained"))
            chosen = QFileDialog.getExistingDirectory(self, "Resume from a checkpoint-N folder", start)
            if not chosen:
                return
            checkpoint = Path(chosen)
        self.start(resume=checkpoint)

    def export_script(self, folder: str | None = None) -> Job | None:
        base, data, val, settings = self._inputs()
        out = Path(self.out_edit.text().strip() or "adapter").expanduser()
        if folder is None:
            start = self.start_folder("train-out", str(data_dir() / "trained"))
            chosen = QFileDialog.getExistingDirectory(self, "Write the training script into", start)
            if not chosen:
                return None
            self.remember_folder("train-out", chosen)
            folder = str(Path(chosen) / f"{out.name}-job")

        def run(*, cancel, report):
            from lora_studio.core.model.sources import resolve_source
            from lora_studio.core.train import TrainRequest
            from lora_studio.core.train.script import export_script

            return export_script(TrainRequest(resolve_source(base), data, out, settings, val), Path(folder))

        def done(exported) -> None:
            self.show_message(
                f"wrote {exported.script} — run it with: accelerate launch --config_file "
                f"{exported.configs[0].name} {exported.script.name}",
                "ok",
            )

        return self.op("exporting the training script", run, exclusive=False, key="train-export").on_success(done).run()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._ensure_plot()  # the empty chart, axes and legend, before the first point

    def _queue_metrics(self, point: TrainMetrics) -> None:  # the worker thread
        with self._lock:
            self._queue.append(point)

    def _ended(self) -> None:
        self._draw_timer.stop()
        self.draw()

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
        self.result = result
        self.last_checkpoint = None
        self._show_result(result)
        self.show_message(f"trained {result.adapter.name}; it is attached to the session (see Adapters)", "ok")
        self.marker.emit("training finished")
        path = str(result.adapter)
        # a moment later, in a turn of its own: the result's table and the chart's last draw repaint the tab first
        # (in the same turn as the attach job's start, the window stalled 60-70 ms on a 2-core machine)
        QTimer.singleShot(ATTACH_DELAY_MS, lambda: self.attach(path))

    def _show_result(self, result: TrainResult) -> None:
        lora, base = result.lora, result.baseline
        kept_loss = result.kept_val_loss
        lines = [
            f"<b>Saved</b> {html.escape(str(result.adapter))} — {result.kept} weights (step {result.kept_step}"
            + (f", validation loss {kept_loss:.4f}" if kept_loss is not None else "")
            + ")",
            f"{result.data_summary}; {lora.steps} steps in {format_duration(lora.seconds)}; "
            f"{lora.trainable_params:,} trainable parameters",
        ]
        if base is not None:
            lines.append(
                "<table><tr><th>run</th><th>trainable</th><th>best val.</th><th>time</th><th>peak RSS</th></tr>"
                + "".join(
                    f"<tr><td>{name}</td><td>{r.trainable_params:,}</td><td>{_loss(r.best_val_loss)}</td>"
                    f"<td>{format_duration(r.seconds)}</td><td>{r.peak_rss_bytes / 1024**2:,.0f} MiB</td></tr>"
                    for name, r in (("LoRA", lora), ("full", base))
                )
                + "</table>"
            )
        other = result.alternative
        if other is not None:
            lines.append(
                f"The {other.kind} weights (step {other.step}, validation loss {_loss(other.val_loss)}) are saved "
                f"too, in {html.escape(str(other.path))}."
            )
            self.swap_btn.setText(f"Keep the {other.kind} weights instead")
            self.swap_btn.setToolTip(
                f"swap them into {result.adapter.name} (the {result.kept} weights move to {other.path.name}) "
                "and attach them in place of the current ones"
            )
        self.swap_btn.setVisible(other is not None)
        self.summary_label.setText("<br>".join(lines))

    def use_alternative(self) -> Job | None:
        """The end-of-run choice: the adapter folder gets the other weights (best or last), attached anew."""
        result = self.result
        if result is None or result.alternative is None:
            return None
        session = self.session
        adapter, other = result.adapter, result.alternative

        def run(*, cancel, report):
            from lora_studio.core.train.save import swap_with_alternative

            swap_with_alternative(adapter, other.path)
            for name, attached in list(session.adapters.items()):
                if Path(attached.path) == adapter:
                    session.delete(name)  # its weights are the ones just moved away
            return result.swapped()

        def done(swapped: TrainResult) -> None:
            self.result = swapped
            self._show_result(swapped)
            self.session_model.refresh()
            self.show_message(f"{adapter.name} now holds the {swapped.kept} weights (step {swapped.kept_step})", "ok")
            self.attach(str(adapter))

        return self.op("keeping the other weights", run).on_success(done).run()

    # -- drawing -------------------------------------------------------------------------------------------------------
    def _ensure_plot(self) -> Any:
        if self.plot is None:
            import pyqtgraph as pg

            plot = line_chart("step", "loss")
            styles = {
                "lora:train": dict(pen=pg.mkPen("#4c78a8", width=2), name="training loss"),
                "lora:val": dict(pen=pg.mkPen("#e45756", width=2), symbol="o", symbolSize=5, name="validation loss"),
                "full:val": dict(
                    pen=pg.mkPen("#777", width=2, style=Qt.PenStyle.DashLine), name="full fine-tuning (val.)"
                ),
            }
            self._curves = {key: plot.plot([], [], **style) for key, style in styles.items()}
            # steps are whole numbers: no "(x0.001)" scale on the axis while the run has one point
            plot.getPlotItem().getAxis("bottom").enableAutoSIPrefix(False)
            self.plot_holder.addWidget(plot)
            self.plot = plot
            self._list_baseline(False)
        return self.plot

    def _list_baseline(self, shown: bool) -> None:
        """The baseline's curve in the legend only for a run that has one."""
        legend = self.plot.getPlotItem().legend if self.plot is not None else None
        curve = self._curves.get("full:val")
        if legend is None or curve is None:
            return
        listed = legend.getLabel(curve) is not None
        if shown and not listed:
            legend.addItem(curve, "full fine-tuning (val.)")
        elif listed and not shown:
            legend.removeItem(curve)

    def _span_run(self, total_steps: int) -> None:
        """The x axis from step 0 to the run's last step, from its first point (the curves grow into it)."""
        if self.plot is not None and total_steps > 0 and self._x_span != total_steps:
            self._x_span = total_steps
            self.plot.setXRange(0, total_steps, padding=0.02)

    def _clear_curves(self) -> None:
        for curve in self._curves.values():
            curve.setData([], [])

    def draw(self) -> None:
        with self._lock:
            points, self._queue = self._queue, []
        if not points:
            return
        self._ensure_plot()
        last = self._last_train_point
        for p in points:
            for kind, value in (("train", p.train_loss), ("val", p.val_loss)):
                if value is not None:
                    xs, ys = self.series.setdefault(f"{p.run}:{kind}", ([], []))
                    xs.append(p.step)
                    ys.append(value)
            if p.warning:
                self.warning_label.setText("⚠ " + p.warning)
                self.warning_label.show()
            if p.train_loss is not None:
                last = p
            self._span_run(p.total_steps)
        self._last_train_point = last  # an evaluation that arrives after the last step still updates the line
        for key, curve in self._curves.items():
            xs, ys = self.series.get(key, ([], []))
            curve.setData(xs, ys)
        if last is not None:
            val = self.series.get(f"{last.run}:val", ([], []))[1]
            what = "baseline " if last.run == "full" else ""
            self.stats_label.setText(
                f"{what}step {last.step}/{last.total_steps} · train {last.train_loss:.4f}"
                + (f" · val {val[-1]:.4f}" if val else "")
                + (f" · lr {last.learning_rate:.2e}" if last.learning_rate is not None else "")
                + (f" · {last.tokens_per_s:,.0f} tokens/s" if last.tokens_per_s else "")
                + f" · {format_duration(last.elapsed_s)} elapsed · ETA {format_duration(last.eta_s)}"
            )


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
