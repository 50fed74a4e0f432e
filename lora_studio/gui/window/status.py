"""The window's status bar: what model job runs, its progress, the one Cancel; and the job lines of the Log.

A model job's start, end, failure or cancellation is one line in the status bar and one in the Log panel; a
side job (an estimate, an inspection) only logs its failure, which its panel says itself.
"""

from __future__ import annotations

import time

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QPushButton, QStatusBar

from lora_studio.core.errors import ErrorDescription
from lora_studio.core.tasks import Progress
from lora_studio.gui.base.jobs import Job, JobRunner
from lora_studio.gui.base.widgets import ElidedLabel, job_progress_bar, reset_progress, show_progress
from lora_studio.gui.docks.log import LogPanel

READY = "Ready. Pick a base model on the left, or drop a model or adapter folder here."


class JobStatus(QObject):
    def __init__(self, runner: JobRunner, log_panel: LogPanel, bar: QStatusBar) -> None:
        super().__init__(bar)
        self.log_panel = log_panel
        # elided to its share of the bar (full text in the tooltip): a long message never widens the window
        self.label = ElidedLabel(READY)
        self.progress = job_progress_bar()
        # wide enough for "verifying: loading the saved folder: 123/456 tensors"; longer texts elide in the middle
        self.progress.setMinimumWidth(300)
        self.progress.setMaximumWidth(420)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(runner.cancel_current)
        self.cancel_btn.setToolTip("Stop the running job at its next safe point")
        bar.addWidget(self.label, 1)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.cancel_btn)
        runner.job_started.connect(self._job_started)
        runner.job_progress.connect(self._job_progress)
        runner.job_finished.connect(self._job_finished)
        runner.job_failed.connect(self._job_failed)
        runner.job_cancelled.connect(self._job_cancelled)
        runner.busy_changed.connect(self._busy_changed)
        runner.refused.connect(self._refused)  # a model job refused while another runs: said in the status bar
        self.runner = runner

    def _job_started(self, job: Job) -> None:
        if job.exclusive:
            self.log_panel.log(f"{job.name}…")
            self.label.setText(f"{job.name}…")
            self.progress.show()
            self.progress.setRange(0, 0)
        elif _beside(job):
            self.log_panel.log(f"{job.name} (beside the window)…")
            self.label.setText(f"{job.name} (beside the window)…")

    def _job_progress(self, job: Job, progress: Progress) -> None:
        if job.exclusive:
            show_progress(self.progress, progress)

    def _job_finished(self, job: Job, _result: object) -> None:
        if job.exclusive or _beside(job):
            self.log_panel.log(f"{job.name}: done in {time.monotonic() - job.started_at:.1f} s")
            self._say_end(job, f"{job.name}: done")

    def _job_failed(self, job: Job, desc: ErrorDescription) -> None:
        # One readable line in the window; the full story (traceback for internal errors) in the log.
        self.log_panel.log(f"{job.name}: {desc.message}", "error", desc.detail if desc.kind == "internal" else "")
        if job.exclusive or _beside(job):  # a side job's failure (an estimate…) is its panel's line, not the window's
            self._say_end(job, f"✖ {desc.message}")

    def _job_cancelled(self, job: Job) -> None:
        if job.exclusive or _beside(job):
            self.log_panel.log(f"{job.name}: cancelled", "warn")
            self._say_end(job, f"{job.name}: cancelled")

    def _say_end(self, job: Job, text: str) -> None:
        """``text`` in the bar, and what still runs beside the window after it (a compare that ends during a
        training run must not leave the bar saying only 'done')."""
        still = [j.name for j in self.runner.running_jobs() if _beside(j) and j is not job]
        self.label.setText(text + "".join(f" · {name} (beside the window)…" for name in still))

    def _busy_changed(self, reason: str) -> None:
        self.cancel_btn.setEnabled(bool(reason))
        if not reason:
            self.progress.hide()
            reset_progress(self.progress)

    def _refused(self, message: str) -> None:
        # the panel that asked says it too, as a warning; not an error for the log (nothing failed)
        self.label.setText(message)


def _beside(job: Job) -> bool:
    """A job the user started that leaves the model to others (a training run in its own process): the status bar
    names it as a model job, without taking the one Cancel; keyed side jobs (estimates, plans) stay quiet."""
    return not job.exclusive and job.key is None
