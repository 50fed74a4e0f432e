"""The main window: base model (left), adapters / Compare / Merge tabs (centre), memory and log (bottom).

Every long job goes through the window's one :class:`~lora_studio.gui.jobs.JobRunner`, and every
panel shows the session through the window's one :class:`~lora_studio.gui.session_model.SessionModel`
(its ``state_changed`` refreshes every panel after any change). The window builds the panels with what
each one needs and connects their signals (chart markers, log lines, Recent menu); it pushes no state
into them. The menus are window_menus.py's, drag and drop drop.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtWidgets import (
    QDockWidget,
    QFrame,
    QMainWindow,
    QScrollArea,
    QTabWidget,
    QWidget,
)

from lora_studio.app_logging import current_log_path
from lora_studio.core.session import Session, SessionState
from lora_studio.core.system.memory import MemorySampler
from lora_studio.gui import drop
from lora_studio.gui.adapter_panel import AdapterPanel
from lora_studio.gui.compare_panel import ComparePanel
from lora_studio.gui.evaluate_panel import EvaluatePanel
from lora_studio.gui.gc_guard import GuiThreadGarbageCollector
from lora_studio.gui.job_status import JobStatus
from lora_studio.gui.jobs import Busy, Job, JobRunner
from lora_studio.gui.log_panel import LogPanel
from lora_studio.gui.memory_panel import MemoryMonitor, MemoryPanel
from lora_studio.gui.merge_panel import MergePanel
from lora_studio.gui.model_panel import ModelPanel
from lora_studio.gui.reduce_panel import ReducePanel
from lora_studio.gui.session_model import SessionModel
from lora_studio.gui.settings import StudioSettings
from lora_studio.gui.startup import Preloader, warm_up
from lora_studio.gui.train_panel import TrainPanel
from lora_studio.gui.widgets import ask_yes_no
from lora_studio.gui.window_menus import WindowMenus


def session_markers(before: SessionState, after: SessionState) -> list[str]:
    """Chart markers for the session changes no panel marks itself: an adapter activated, a combination added.

    Loads, attaches, detaches and unloads are marked by whoever ran them; a new base marks nothing here.
    """
    if after.base != before.base or after.base_path != before.base_path:
        return []
    names_before = {name for name, _, _ in before.adapters}
    marks = [
        f"combined {name}"
        for name, path, _ in after.adapters
        if name not in names_before and str(path).startswith("combination (")
    ]
    if after.active_adapter and after.active_adapter != before.active_adapter and after.active_adapter in names_before:
        marks.append(f"activated {after.active_adapter}")
    return marks


class MainWindow(QMainWindow):
    def __init__(
        self,
        *,
        session: Session | None = None,
        sampler: MemorySampler | None = None,
        settings: StudioSettings | None = None,
        sample_interval_s: float = 0.25,
    ) -> None:
        super().__init__()
        self.setWindowTitle("LoRA Studio")
        self.setAcceptDrops(True)
        self.setDockNestingEnabled(True)
        self.session = session or Session()
        self.settings = settings or StudioSettings()
        # asked (with the running job's name) before the window closes during a model job; tests replace it
        self.confirm_quit: Callable[[str], bool] = self._ask_quit
        self.gc_guard = GuiThreadGarbageCollector(self)  # before any worker exists
        self.runner = JobRunner(self)
        self.session_model = SessionModel(self.session, self.runner, self)  # before the panels: it refreshes first
        self.monitor = MemoryMonitor(sampler, sample_interval_s, self)
        gpus = len(self.monitor.sampler.read_gpus())

        self.log_panel = LogPanel()
        self.log_panel.show_log_file(current_log_path())
        self.memory_panel = MemoryPanel(self.monitor)
        self.model_panel = ModelPanel(self.runner, self.session_model, gpu_count=gpus)
        self.adapter_panel = AdapterPanel(self.runner, self.session_model, self.monitor.sampler)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.adapter_panel, "Adapters")
        self.setCentralWidget(self.tabs)
        self.compare_panel = ComparePanel(self.runner, self.session_model)
        self.tabs.addTab(self.compare_panel, "Compare")
        self.evaluate_panel = EvaluatePanel(
            self.runner,
            self.session_model,
            merged_models=lambda: self.compare_panel.merged,
            open_in_compare=self.open_in_compare,
            use_scale=self.use_scale_in_merge,
        )
        self.tabs.addTab(self.evaluate_panel, "Evaluate")
        self.reduce_panel = ReducePanel(self.runner, self.session_model)
        self.tabs.addTab(self.reduce_panel, "Reduce")
        self.merge_panel = MergePanel(
            self.runner,
            self.session_model,
            compare=self.compare_panel,
            show_compare_tab=lambda: self.tabs.setCurrentWidget(self.compare_panel),
        )
        self.tabs.addTab(self.merge_panel, "Merge")
        self.train_panel = TrainPanel(self.runner, self.session_model, attach=self.attach_adapter)
        self.tabs.addTab(self.train_panel, "Train")

        # the Base model column runs the window's full height (Load and the Loaded box in view at 720 pixels);
        # Memory and Log share the bottom right of it
        self.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.model_dock = self._dock("Base model", self.model_panel, Qt.DockWidgetArea.LeftDockWidgetArea, "dock-model")
        self.memory_dock = self._dock(
            "Memory", self.memory_panel, Qt.DockWidgetArea.BottomDockWidgetArea, "dock-memory"
        )
        self.log_dock = self._dock("Log", self.log_panel, Qt.DockWidgetArea.BottomDockWidgetArea, "dock-log")
        self.splitDockWidget(self.memory_dock, self.log_dock, Qt.Orientation.Horizontal)

        # status bar: what is running, its progress, and the one Cancel for model jobs
        self.job_status = JobStatus(self.runner, self.log_panel, self.statusBar())
        self.status_label, self.job_progress = self.job_status.label, self.job_status.progress
        self.cancel_btn = self.job_status.cancel_btn

        self.menus = WindowMenus(self)
        self._connect()
        self._restore()

    # -- construction -------------------------------------------------------------------------------------------------
    def _dock(self, title: str, widget: QWidget, area, name: str) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)  # saveState needs names
        # scrolled, so a panel that grows (a loaded model's details, a verdict) never makes the window taller than
        # the screen, nor re-lays out the whole window in the middle of a job
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(widget)
        dock.setWidget(scroll)
        dock.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QDockWidget.DockWidgetFeature.DockWidgetFloatable
            | QDockWidget.DockWidgetFeature.DockWidgetClosable
        )
        self.addDockWidget(area, dock)
        return dock

    def _connect(self) -> None:
        self.model_panel.loaded.connect(self._base_loaded)
        panels = (
            self.model_panel,
            self.adapter_panel,
            self.compare_panel,
            self.evaluate_panel,
            self.reduce_panel,
            self.merge_panel,
            self.train_panel,
        )
        for panel in panels:
            panel.marker.connect(self.memory_panel.mark)
            panel.log_line.connect(self.log_panel.log)
            panel.folders = self.settings  # file dialogs open where the last one of their kind ended
        self.session_model.state_changed.connect(self._mark_session_change)
        self._marked_state = self.session_model.state
        self.adapter_panel.released.connect(self._released)
        self.adapter_panel.adapter_attached.connect(self.settings.add_recent_adapter)

    def _restore(self) -> None:
        geometry, state = self.settings.window_geometry(), self.settings.window_state()
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            size = QSize(1280, 820)
            screen = self.screen()
            if screen is not None:  # a laptop screen: the first window fits on it, status bar included
                size = size.boundedTo(screen.availableGeometry().size())
            self.resize(size)
        if state is not None:
            self.restoreState(state)
        else:
            self.fit_docks()

    def fit_docks(self) -> None:
        """The first layout, for this window's size: a Base model column of ~330 px, Memory and Log below the
        tabs taking ~30 % of the height (the Adapters tab keeps room for the inspector's fields and chart),
        Memory wider than Log."""
        width, height = self.width(), self.height()
        model_width = max(300, min(340, int(width * 0.26)))
        bottom = max(190, min(260, int(height * 0.3)))
        self.resizeDocks([self.model_dock], [model_width], Qt.Orientation.Horizontal)
        self.resizeDocks([self.memory_dock, self.log_dock], [bottom, bottom], Qt.Orientation.Vertical)
        rest = width - model_width
        self.resizeDocks(
            [self.memory_dock, self.log_dock], [int(rest * 0.58), int(rest * 0.42)], Qt.Orientation.Horizontal
        )

    # -- what the panels tell the window ----------------------------------------------------------------------------
    def open_in_compare(self, prompt: str, variants: list[str]) -> None:
        """An example of the Evaluate tab in Compare: its prompt, the same variants, run."""
        compare = self.compare_panel
        base = compare.base_name()
        compare.set_prompts([prompt])
        compare.set_ticked([base if name == "base" else name for name in variants])
        self.tabs.setCurrentWidget(compare)
        compare.run()

    def use_scale_in_merge(self, adapter: str, scale: float) -> None:
        self.merge_panel.use_scale(adapter, scale)
        self.tabs.setCurrentWidget(self.merge_panel)

    def _base_loaded(self, state) -> None:
        self.memory_panel.mark(f"loaded {state.base}")
        if state.base_path:
            self.settings.add_recent_base(state.base_path)

    def _released(self, reclaimed) -> None:
        self.memory_panel.show_release(reclaimed)
        self.log_panel.log(reclaimed.message(), "warn" if reclaimed.leaked else "info")

    def _mark_session_change(self, state: SessionState) -> None:
        for text in session_markers(self._marked_state, state):
            self.memory_panel.mark(text)
        self._marked_state = state

    def show_error(self, message: str) -> None:
        self.status_label.setText(f"✖ {message}")
        self.log_panel.log(message, "error")

    # -- actions ------------------------------------------------------------------------------------------------------
    def _guard(self, fn, *args):
        """Run a panel action; a refusal or an error is said in the window and ``None`` returned."""
        from lora_studio.core.errors import describe

        try:
            return fn(*args)
        except Busy:
            return None  # the runner said why (its refused signal)
        except Exception as exc:  # noqa: BLE001 - anything else: one line in the window, never a dialog
            self.show_error(describe(exc).message)
            return None

    def open_base(self, path: str) -> Job | None:
        self.model_panel.set_source(str(path))
        return self._guard(self.model_panel.load)

    def attach_adapter(self, path: str) -> Job | None:
        if not self.session_model.state.loaded:
            self.show_error("load a base model before attaching an adapter")
            return None
        return self._guard(self.adapter_panel.attach, str(path))

    def load_demo(self):
        """--demo: convert/find the demo model, load it, attach the shipped demo adapters (one job)."""
        from lora_studio.core.demo import assets as demo_assets
        from lora_studio.core.demo import model as demo
        from lora_studio.core.errors import UserError
        from lora_studio.core.tasks import Progress

        session = self.session

        def run(*, cancel, report):
            source = demo.ensure_demo_model(cancel=cancel, report=report)
            session.load(source, dtype="float32", device_map="cpu", cancel=cancel, report=report)
            try:
                adapters = demo_assets.demo_adapters()
            except UserError:
                adapters = []
            for i, adapter in enumerate(adapters):
                cancel.raise_if_cancelled()
                report(Progress(i, len(adapters), f"attaching {adapter.name}", "adapters"))
                session.attach(adapter.path, adapter.name, activate=(i == 0), cancel=cancel)
            return session.state()

        def done(state):
            self.model_panel.source_edit.setText(state.base_path or "")
            self._base_loaded(state)
            if state.adapters:
                names = ", ".join(a[0] for a in state.adapters)
                self.memory_panel.mark(f"attached {names}")
                self.log_panel.log(f"attached the demo adapters: {names} ({state.active_adapter} active)")
            self.status_label.setText(f"demo loaded: {state.base} with {len(state.adapters)} adapters")
            self.compare_panel.prefill_demo()
            self.train_panel.prefill_demo()
            if state.active_adapter:
                self.adapter_panel.select(state.active_adapter)  # the inspector and loss plot show something at once
            self._log_since_start("demo ready")

        return self._guard(lambda: self.runner.submit("loading the demo model", run, on_done=done))

    # -- drag and drop (drop.py) --------------------------------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:
        if drop.accepts(event.mimeData()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        self.handle_drop(drop.dropped_paths(event.mimeData()))
        event.acceptProposedAction()

    def handle_drop(self, paths: list[Path]) -> None:
        """A model folder or .gguf loads as the base; an adapter folder is attached (queued after a base load)."""
        drop.handle_drop(self, paths)

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    shown_at: float | None = None  # time.time() of the first paint (startup measurement)
    _closed = False
    _started = False  # the first show ran _after_shown

    def _log_since_start(self, what: str, until: str = "") -> None:
        """'<what> after 1.23 s (process start → <until>)' in the log panel and on stdout."""
        import time

        import psutil

        seconds = (
            self.shown_at if until == "first paint" and self.shown_at else time.time()
        ) - psutil.Process().create_time()
        line = f"{what} after {seconds:.2f} s (process start → {until or what})"
        self.log_panel.log(line)
        print(line, flush=True)

    def _log_first_paint(self) -> None:
        self._log_since_start("window interactive", "first paint")

    def paintEvent(self, event) -> None:
        super().paintEvent(event)
        if self.shown_at is None:
            import time

            self.shown_at = time.time()
            QTimer.singleShot(0, self._log_first_paint)  # a bound slot: dropped if the window is gone by then

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._started:
            self._started = True
            QTimer.singleShot(0, self._after_shown)

    def _after_shown(self) -> None:
        if self._closed:
            return
        # Off the critical path: sampling, the local model scan, and pyqtgraph's import on a thread.
        self.monitor.start()
        self.model_panel.refresh_local()
        self._preloader = Preloader(self)
        self._preloader.ready.connect(self._build_charts)
        self._preloader.start("pyqtgraph")
        session, runner = self.session, self.runner
        self.runner.submit(
            "preparing torch",
            lambda *, cancel, report: warm_up(
                cancel=cancel, report=report, safe_to_freeze=lambda: not session.loaded and runner.current is None
            ),
            exclusive=False,
            key="warm-up",
        )

    def _build_charts(self) -> None:
        # the memory chart in this event-loop turn, the inspector's two in the next (pyqtgraph set-up costs
        # ~50-100 ms a turn); done now, while the window is fresh, not when an adapter is first selected
        if self._closed:
            return
        self.memory_panel.build_chart()
        QTimer.singleShot(0, self._build_inspector_charts)

    def _build_inspector_charts(self) -> None:
        if not self._closed:
            self.adapter_panel.build_charts()

    # -- closing ------------------------------------------------------------------------------------------------------
    def _ask_quit(self, job_name: str) -> bool:
        return ask_yes_no(
            self,
            "Quit LoRA Studio?",
            f"“{job_name}” is still running.\n\nQuit anyway? The job is cancelled at its next safe point first.",
        )

    def closeEvent(self, event) -> None:
        job = None if self._closed else self.runner.current
        if job is not None and not job.done and not self.confirm_quit(job.name):
            event.ignore()  # the user keeps the window and the job
            return
        self.settings.save_window(self.saveGeometry(), self.saveState())
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop sampling and every job; waits for the workers (used by close and by tests)."""
        self._closed = True
        self.monitor.close()
        self.runner.shutdown()
        self.gc_guard.close()
