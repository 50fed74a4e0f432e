"""The main window: the Base model dock (left), the registry's tabs (centre), Memory and Log (bottom).

Every long job goes through the window's one :class:`~lora_studio.gui.base.jobs.JobRunner`, and every
panel shows the session through the window's one :class:`~lora_studio.gui.base.session_model.SessionModel`
(its ``state_changed`` refreshes every panel after any change). The window builds every panel from one
:class:`~lora_studio.gui.base.context.TabContext` and connects their signals (chart markers, log lines, Recent
menu). It is the context's navigator: a cross-tab action ("open in Compare", "merge at this scale") calls the
target tab's public methods here. It also fills the Base model dock, Compare and Train for the demo
(:meth:`MainWindow.load_demo`). The menus are menus.py's, drag and drop drop.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from PySide6.QtCore import QCoreApplication, QEventLoop, QSize, Qt, QTimer
from PySide6.QtGui import QCloseEvent, QDragEnterEvent, QDropEvent, QPaintEvent, QResizeEvent, QShowEvent
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
from lora_studio.core.system.devices import mps_here
from lora_studio.core.system.memory import MemorySampler, Reclaimed
from lora_studio.core.tasks import CancelToken, Report
from lora_studio.gui.base.beside_store import BesideModels
from lora_studio.gui.base.context import TabContext
from lora_studio.gui.base.gc_guard import GuiThreadGarbageCollector
from lora_studio.gui.base.jobs import Busy, Job, JobRunner
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.base.session_model import SessionModel
from lora_studio.gui.base.settings import StudioSettings
from lora_studio.gui.base.widgets import ask_yes_no
from lora_studio.gui.docks.log import LogPanel
from lora_studio.gui.docks.memory import MemoryMonitor, MemoryPanel
from lora_studio.gui.docks.model import ModelPanel
from lora_studio.gui.tabs.adapters.panel import AdapterPanel
from lora_studio.gui.tabs.compare.panel import ComparePanel
from lora_studio.gui.tabs.evaluate.panel import EvaluatePanel
from lora_studio.gui.tabs.merge.panel import MergePanel
from lora_studio.gui.tabs.reduce.panel import ReducePanel
from lora_studio.gui.tabs.train.panel import TrainPanel
from lora_studio.gui.window import drop
from lora_studio.gui.window.menus import MenuActions, WindowMenus
from lora_studio.gui.window.startup import Preloader, warm_up
from lora_studio.gui.window.status import JobStatus
from lora_studio.gui.window.tabs import TABS

P = TypeVar("P", bound=Panel)
log = logging.getLogger(__name__)
# the Base model column never gets narrower than this (a small window squeezes the tabs instead)
MIN_MODEL_DOCK_WIDTH = 256  # the column's content whole (241 px) beside its vertical scroll bar
# under these a dock is squeezed out of use (the column scrolls sideways, the memory chart is a strip): when the
# window has room for more, on a resize and at the start, it is laid out anew
USABLE_MODEL_DOCK_WIDTH = 260
USABLE_BOTTOM_DOCK_HEIGHT = 120
ROOMY_WINDOW = QSize(1200, 680)  # a window at least this large has room for every dock's usable size
REPAIR_DELAY_MS = 300  # after the last resize (a drag resizes many times)


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
        self.store = BesideModels(self)  # merged models loaded beside the session: Compare shows, Evaluate scores
        self.context = TabContext(
            runner=self.runner,
            session_model=self.session_model,
            settings=self.settings,
            store=self.store,
            sampler=self.monitor.sampler,
            navigator=self,
        )
        self.model_panel = ModelPanel(self.context, gpu_count=gpus, mps=mps_here())

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.setCentralWidget(self.tabs)
        self.panels: dict[str, Panel] = {}  # the registry's tabs by key, in their order
        for spec in TABS:
            self.panels[spec.key] = panel = spec.build(self.context)
            self.tabs.addTab(panel, spec.title)
        self.adapter_panel = self.tab(AdapterPanel)
        self.compare_panel = self.tab(ComparePanel)
        self.evaluate_panel = self.tab(EvaluatePanel)
        self.reduce_panel = self.tab(ReducePanel)
        self.merge_panel = self.tab(MergePanel)
        self.train_panel = self.tab(TrainPanel)

        # the Base model column runs the window's full height (Load and the Loaded box in view at 720 pixels);
        # Memory and Log share the bottom right of it
        self.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.model_dock = self._dock("Base model", self.model_panel, Qt.DockWidgetArea.LeftDockWidgetArea, "dock-model")
        self.model_dock.setMinimumWidth(MIN_MODEL_DOCK_WIDTH)  # a small window squeezes the tabs, not this column
        self.memory_dock = self._dock(
            "Memory", self.memory_panel, Qt.DockWidgetArea.BottomDockWidgetArea, "dock-memory"
        )
        self.log_dock = self._dock("Log", self.log_panel, Qt.DockWidgetArea.BottomDockWidgetArea, "dock-log")
        self.splitDockWidget(self.memory_dock, self.log_dock, Qt.Orientation.Horizontal)

        # status bar: what is running, its progress, and the one Cancel for model jobs
        self.job_status = JobStatus(self.runner, self.log_panel, self.statusBar())

        self.menus = WindowMenus(
            self,
            MenuActions(
                open_folder=self.model_panel.browse_folder,
                open_gguf=self.model_panel.browse_gguf,
                open_demo=self.load_demo,
                attach_folder=self.adapter_panel.browse_attach,
                open_base=self.open_base,
                attach_adapter=self.attach_adapter,
                reset_layout=self.reset_layout,
            ),
            (self.model_dock, self.memory_dock, self.log_dock),
            self.settings,
        )
        self._connect()
        self._restore()

    # -- construction -------------------------------------------------------------------------------------------------
    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea, name: str) -> QDockWidget:
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
        for panel in (self.model_panel, *self.panels.values()):
            panel.marker.connect(self.memory_panel.mark)
            panel.log_line.connect(self.log_panel.log)
        self.session_model.state_changed.connect(self._mark_session_change)
        self._marked_state = self.session_model.state
        self.adapter_panel.released.connect(self._released)
        self.adapter_panel.adapter_attached.connect(self.settings.add_recent_adapter)
        self.merge_panel.model_saved.connect(self.model_panel.add_saved_models)

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
            self.restoreState(state)  # checked for collapsed docks once shown (_after_shown)
        else:
            self.fit_docks()

    def reset_layout(self) -> None:
        """View → Reset layout: every dock shown, docked where it starts, at the first layout's sizes."""
        for dock in (self.model_dock, self.memory_dock, self.log_dock):
            dock.setFloating(False)
            dock.show()
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.model_dock)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.memory_dock)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.log_dock)
        self.splitDockWidget(self.memory_dock, self.log_dock, Qt.Orientation.Horizontal)
        self.fit_docks()

    def collapsed_docks(self) -> list[QDockWidget]:
        """Docks shown in the window but squeezed below use (a layout saved in a small window): the Base model
        column under its minimum width, Memory or Log under their minimum height."""
        docked = [d for d in (self.model_dock, self.memory_dock, self.log_dock) if d.isVisible() and not d.isFloating()]
        return [
            d
            for d in docked
            if (d is self.model_dock and d.width() < USABLE_MODEL_DOCK_WIDTH)
            or (d is not self.model_dock and d.height() < USABLE_BOTTOM_DOCK_HEIGHT)
        ]

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        # back from a small size, Qt leaves the docks as small as they were: a roomy window gets them back
        if self._started and self._repair_timer is not None:
            self._repair_timer.start()

    def _repair_layout(self) -> None:
        """A saved layout that left a dock collapsed is laid out anew, as the first start does."""
        if self.width() < ROOMY_WINDOW.width() or self.height() < ROOMY_WINDOW.height():
            return  # a small window: small docks are its choice
        collapsed = [d.objectName() for d in self.collapsed_docks()]
        if collapsed:
            log.info("the saved layout left %s collapsed: laid out anew", ", ".join(collapsed))
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

    def tab(self, kind: type[P]) -> P:
        """The registry's tab of this panel class."""
        return next(panel for panel in self.panels.values() if isinstance(panel, kind))

    # -- the navigator: actions that start in one tab and end in another (base/context.py) -------------------------
    def open_in_compare(self, prompt: str, variants: Sequence[str]) -> None:
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

    def add_combination_variant(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None:
        return self.compare_panel.add_combination_variant(name, weights, combination_type, density)

    def add_merged_variant(self, path: str, against: tuple[str, ...] = ()) -> Job | None:
        return self.compare_panel.add_merged_variant(path, against)

    def show_compare_tab(self) -> None:
        self.tabs.setCurrentWidget(self.compare_panel)

    def _base_loaded(self, state: SessionState) -> None:
        self.memory_panel.mark(f"loaded {state.base} ({state.quantize or state.dtype})")  # two loads of one model
        if state.base_path:
            self.settings.add_recent_base(state.base_path)

    def _released(self, reclaimed: Reclaimed) -> None:
        self.memory_panel.show_release(reclaimed)
        self.log_panel.log(reclaimed.message(), "warn" if reclaimed.leaked else "info")

    def _mark_session_change(self, state: SessionState) -> None:
        for text in session_markers(self._marked_state, state):
            self.memory_panel.mark(text)
        self._marked_state = state

    def show_error(self, message: str) -> None:
        self.job_status.label.setText(f"✖ {message}")
        self.log_panel.log(message, "error")

    # -- actions ------------------------------------------------------------------------------------------------------
    def _guard(self, fn: Callable[..., Job | None], *args: object) -> Job | None:
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

    def load_demo(self) -> Job | None:
        """--demo: convert/find the demo model, load it, attach the shipped demo adapters (one job)."""
        from lora_studio.core.demo import assets as demo_assets
        from lora_studio.core.demo import model as demo
        from lora_studio.core.errors import UserError
        from lora_studio.core.tasks import Progress

        session = self.session
        if not self.model_panel.may_replace_base():  # as loading any other base asks
            return None

        def run(*, cancel: CancelToken, report: Report) -> SessionState:
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

        def done(state: SessionState) -> None:
            self.model_panel.source_edit.setText(state.base_path or "")
            self._base_loaded(state)
            if state.adapters:
                names = ", ".join(a[0] for a in state.adapters)
                self.memory_panel.mark(f"attached {names}")
                self.log_panel.log(f"attached the demo adapters: {names} ({state.active_adapter} active)")
            self.job_status.label.setText(f"demo loaded: {state.base} with {len(state.adapters)} adapters")
            self.compare_panel.prefill_demo()
            self.train_panel.prefill_demo()
            self.adapter_panel.try_it.prefill_demo(state.active_adapter)
            if state.active_adapter:
                self.adapter_panel.select(state.active_adapter)  # the inspector and loss plot show something at once
            self._log_since_start("demo ready")

        return self._guard(lambda: self.runner.submit("loading the demo model", run, on_done=done))

    # -- drag and drop (drop.py) --------------------------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if drop.accepts(event.mimeData()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        self.handle_drop(drop.dropped_paths(event.mimeData()))
        event.acceptProposedAction()

    def handle_drop(self, paths: list[Path]) -> None:
        """A model folder or .gguf loads as the base; an adapter folder is attached (queued after a base load)."""
        drop.handle_drop(self, paths)

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    shown_at: float | None = None  # time.time() of the first paint (startup measurement)
    _closed = False
    _started = False  # the first show ran _after_shown
    _repair_timer: QTimer | None = None  # made once shown: a resize then checks the docks (see _repair_layout)

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

    def paintEvent(self, event: QPaintEvent) -> None:
        super().paintEvent(event)
        if self.shown_at is None:
            import time

            self.shown_at = time.time()
            QTimer.singleShot(0, self._log_first_paint)  # a bound slot: dropped if the window is gone by then

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if not self._started:
            self._started = True
            QTimer.singleShot(0, self._after_shown)

    def _after_shown(self) -> None:
        if self._closed:
            return
        self._repair_timer = QTimer(self)
        self._repair_timer.setSingleShot(True)
        self._repair_timer.setInterval(REPAIR_DELAY_MS)
        self._repair_timer.timeout.connect(self._repair_layout)
        # sizes are known once the window is shown and laid out: a saved layout, or a resize before now, that left a
        # dock collapsed is repaired then
        self._repair_timer.start()
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
            f"“{job_name}” is still running.\n\nQuit anyway? The job is cancelled at its next safe point first"
            + (
                f" (a training run after its current step: its checkpoints stay in {self.train_panel.checkpoints}, "
                "and Resume continues from them)."
                if job_name == "training" and self.train_panel.checkpoints
                else "."
            ),
        )

    def closeEvent(self, event: QCloseEvent) -> None:
        # a training run beside the session's work is not the runner's current job, and it is the one to ask about
        training = self.train_panel.job if self.train_panel.running else None
        job = None if self._closed else (training or self.runner.current)
        if job is not None and not job.done and not self.confirm_quit(job.name):
            event.ignore()  # the user keeps the window and the job
            return
        self.settings.save_window(self.saveGeometry(), self.saveState())
        if job is not None and not job.done:
            # the window goes at once; the job stops at its safe point behind it (a run writes its step's checkpoint)
            self.hide()
            QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.ExcludeUserInputEvents)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop sampling and every job; waits for the workers (used by close and by tests)."""
        self._closed = True
        self.monitor.close()
        self.runner.shutdown()
        self.gc_guard.close()
