"""The Evaluate tab: score the ticked variants on datasets, see where each changed, sweep an adapter's scale.

Left: the data files (by default the attached adapters' validation sets, else the demo sets), the variants
(the base, every attached adapter and combination, the merged folders loaded in Compare, GGUF files added
here) and the reference (:mod:`.inputs`). Right: the summary per set (loss, perplexity, accuracy, KL, Δloss
with its 95 % interval, regressions), the per-example table (sortable by the change; a double-click opens the
example in Compare with every variant) (:mod:`.tables`), and the scale sweep (loss and KL from the base against
the scale; "Use in Merge" hands the best scale to the Merge tab) (:mod:`.sweep`). "Save report…" writes the
evaluation as HTML, Markdown, JSONL or CSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtWidgets import QFileDialog, QHBoxLayout, QPushButton, QTabWidget, QVBoxLayout, QWidget

from lora_studio.core.errors import UserError
from lora_studio.core.session import SessionState
from lora_studio.gui.base.file_filters import EVAL_DATA_FILTER, GGUF_FILTER
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.base.widgets import side_by_side
from lora_studio.gui.tabs.evaluate.inputs import DataBox, VariantsBox
from lora_studio.gui.tabs.evaluate.sweep import SweepBox
from lora_studio.gui.tabs.evaluate.tables import ExamplesPage, SummaryPage

if TYPE_CHECKING:
    from lora_studio.core.evaluate.run import EvaluationResult
    from lora_studio.core.evaluate.scale import ScaleSweep
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.context import TabContext

SCALE_PAGE = 2  # the Scale page's index among the results' tabs


class EvaluatePanel(Panel):
    def __init__(self, ctx: TabContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.store = ctx.store  # the merged folders loaded beside the session (in Compare)
        self.navigator = ctx.navigator
        self.result: EvaluationResult | None = None
        self.sweep: ScaleSweep | None = None
        self.ggufs: dict[str, Path] = {}
        self._data_is_default = True
        left = self._build_inputs()
        self.results_tabs = self._build_results()
        self._build_layout(left)
        self._connect()
        self.show_state(self.state)

    # -- building ------------------------------------------------------------------------------------------------------
    def _build_inputs(self) -> QWidget:
        """The left column: data, variants and the reference, Evaluate / Cancel / Save report…, progress."""
        self.data = DataBox()
        self.variants = VariantsBox()
        self.run_btn = QPushButton("Evaluate")
        self.run_btn.setDefault(True)
        self.stop_btn = QPushButton("Cancel")
        self.stop_btn.setEnabled(False)
        self.save_btn = QPushButton("Save report…")
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.stop_btn)
        buttons.addStretch(1)
        buttons.addWidget(self.save_btn)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(self.data)
        left_layout.addWidget(self.variants, 1)
        left_layout.addLayout(buttons)
        left_layout.addWidget(self.progress)
        left_layout.addWidget(self.message)
        self.progress.hide()
        left.setMinimumWidth(260)
        return left

    def _build_results(self) -> QTabWidget:
        """The right side: the Summary, Examples and Scale pages."""
        self.summary = SummaryPage()
        self.examples = ExamplesPage()
        self.scale_box = SweepBox()
        tabs = QTabWidget()
        tabs.addTab(self.summary, "Summary")
        tabs.addTab(self.examples, "Examples")
        tabs.addTab(self.scale_box, "Scale")
        return tabs

    def _build_layout(self, left: QWidget) -> None:
        splitter = side_by_side(left, self.results_tabs, (300, 600))
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

    def _connect(self) -> None:
        self.data.add_requested.connect(self.browse_data)
        self.data.removed.connect(self._data_removed)
        self.data.defaults_requested.connect(self.use_default_data)
        self.variants.add_gguf_requested.connect(self.browse_gguf)
        self.variants.changed.connect(self.update_buttons)
        self.run_btn.clicked.connect(self.run)
        self.stop_btn.clicked.connect(self.stop)
        self.save_btn.clicked.connect(self.save_report)
        self.examples.example_opened.connect(self._open_example)
        self.scale_box.sweep_requested.connect(self.run_sweep)
        self.scale_box.apply_requested.connect(self.apply_best_scale)
        self.scale_box.merge_requested.connect(self.merge_at_best_scale)
        self.scale_box.scale_adapter.currentTextChanged.connect(lambda _name: self.refresh_sweep_data())

    # -- state ---------------------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        super().show_state(state)
        self.refresh_variants()
        if self._data_is_default:
            self.use_default_data()
        # a sweep on the screen stays with the adapter it measured; with none, a newly attached adapter is chosen
        self.scale_box.set_adapters([name for name, _path, _size in state.adapters], choose_new=self.sweep is None)
        self.refresh_sweep_data()
        self.update_buttons()

    def forget_base(self) -> None:
        """Scores of the last base are not this one's: the tables, the sweep and Save report go."""
        super().forget_base()
        if self.job is None:
            self.result, self.sweep = None, None
            self.summary.clear()
            self.examples.clear()
            self.scale_box.clear()
            self.update_buttons()

    def refresh_sweep_data(self) -> None:
        """The sweep's data choices follow the files and the adapter chosen (its validation set first)."""
        from lora_studio.core.evaluate.datasets import default_set_for

        chosen = self.scale_box.scale_adapter.currentText()
        folder = next((Path(path) for name, path, _size in self.state.adapters if name == chosen), None)
        own = default_set_for(folder) if folder is not None and folder.is_dir() else None
        self.scale_box.set_data_choices(self.data_files(), own)

    def available_variants(self) -> list[tuple[str, str]]:
        """(name, kind) of every variant that can be ticked now."""
        if not self.state.loaded:
            return []
        out = [("base", "base")]
        out += [(name, "adapter") for name, _path, _size in self.state.adapters]
        out += [(name, "merged") for name in self.store.models]
        out += [(name, "gguf") for name in self.ggufs]
        return out

    def refresh_variants(self) -> None:
        self.variants.show_variants(self.available_variants(), self.ggufs)

    @property
    def count(self) -> int:
        return self.variants.count

    def ticked(self) -> list[tuple[str, str]]:
        return self.variants.ticked()

    def set_ticked(self, names: list[str]) -> None:
        self.variants.set_ticked(names)

    def update_buttons(self) -> None:
        running = self.job is not None
        reason = self.busy_reason or ("" if self.state.loaded else "load a base model first")
        run_reason = reason or ("" if self.ticked() else "tick at least one variant")
        run_reason = run_reason or ("" if self.data_files() else "add an evaluation file")
        sweep_reason = reason or ("" if self.scale_box.scale_adapter.count() else "attach an adapter first")
        sweep_reason = sweep_reason or (
            "" if self.scale_box.sweep_files(self.data_files()) else "add an evaluation file"
        )
        best = "" if self.sweep is not None else "sweep a scale first"
        self.set_reasons(
            {
                self.run_btn: (run_reason, "score every ticked variant on the data"),
                self.scale_box.sweep_btn: (sweep_reason, "evaluate the adapter at each scale"),
                self.save_btn: ("" if self.result else "evaluate first", "save the evaluation as a report"),
                self.scale_box.apply_scale_btn: (best or reason, "run the adapter at the best scale in the session"),
                self.scale_box.merge_scale_btn: (best, "tick the adapter alone in the Merge tab at the best scale"),
            }
        )
        self.stop_btn.setEnabled(running)

    # -- data ----------------------------------------------------------------------------------------------------------
    def data_files(self) -> list[Path]:
        return self.data.files()

    def set_data_files(self, paths: list[Path], *, default: bool = False) -> None:
        self.data.set_files(paths)
        self._data_is_default = default
        self.refresh_sweep_data()
        self.update_buttons()

    def use_default_data(self) -> None:
        from lora_studio.core.evaluate.datasets import default_sets

        folders = [Path(path) for _name, path, _size in self.state.adapters if Path(path).is_dir()]
        self.set_data_files(default_sets(folders), default=True)

    def browse_data(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Evaluation data", self.start_folder("eval-data"), EVAL_DATA_FILTER
        )
        if paths:
            self.remember_folder("eval-data", str(Path(paths[0]).parent))
            files = [] if self._data_is_default else self.data_files()
            self.set_data_files(files + [Path(p) for p in paths if Path(p) not in files])

    def _data_removed(self) -> None:
        self._data_is_default = False
        self.refresh_sweep_data()
        self.update_buttons()

    def browse_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A GGUF file to score", self.start_folder("gguf"), GGUF_FILTER)
        if path:
            self.add_gguf(Path(path))

    def add_gguf(self, path: Path) -> None:
        self.remember_folder("gguf", str(path.parent))
        name = path.name.removesuffix(".gguf")
        self.ggufs[name] = path
        self.refresh_variants()

    # -- the evaluation ------------------------------------------------------------------------------------------------
    def _columns(self) -> list[Any]:
        from lora_studio.core.compare import Variant
        from lora_studio.core.evaluate.columns import GgufVariant

        merged = self.store.models
        columns: list[Any] = []
        for name, kind in self.ticked():
            if kind == "base":
                columns.append(Variant.base())
            elif kind == "adapter":
                columns.append(Variant.of_adapter(name))
            elif kind == "merged" and name in merged:
                columns.append(Variant.merged(merged[name], name))
            elif kind == "gguf":
                columns.append(GgufVariant(name, self.ggufs[name]))
        return columns

    def run(self) -> Job | None:
        from lora_studio.core.evaluate import datasets
        from lora_studio.core.evaluate.run import evaluate

        columns, files = self._columns(), self.data_files()
        reference, limit = self.variants.reference(), self.data.limit()

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> EvaluationResult:
            with session.lock:
                sets = datasets.load_eval_sets(
                    files, session.tokenizer, limit=limit, max_length=datasets.max_length_for(session.model)
                )
            return evaluate(session, columns, sets, reference=reference, cancel=cancel, report=report)

        what = f"evaluating {len(columns)} variants"
        job = self.run_cancellable(self.op(what, fn).on_success(self.show_result))
        if job is not None:
            self.show_message(f"{what}…")
        return job

    def show_result(self, result: EvaluationResult) -> None:
        self.result = result
        self.summary.show_result(result)
        self.examples.show_result(result)
        how = "in one mixed-adapter batch" if result.mixed_batch else f"one at a time ({result.fallback_reason})"
        count = sum(len(s.examples) for s in result.sets)
        if result.fallback_reason is None and not result.mixed_batch:
            how = "alone"
        self.show_message(f"{len(result.variants)} variants on {count} examples {how}, {result.seconds:.1f} s", "ok")
        self.marker.emit("evaluated")
        self.update_buttons()

    def _open_example(self, index: int) -> None:
        """Open the result's example ``index`` in Compare with the variants Compare can run."""
        result = self.result
        if result is None:
            return
        example = result.examples[index]
        kinds = dict(self.available_variants())
        names = [n for n in result.names if kinds.get(n) in ("base", "adapter", "merged")]
        self.navigator.open_in_compare(example.prompt, names)

    # -- scale ---------------------------------------------------------------------------------------------------------
    def run_sweep(self) -> Job | None:
        from lora_studio.core.evaluate import datasets
        from lora_studio.core.evaluate.scale import parse_scales, sweep_scale

        adapter = self.scale_box.scale_adapter.currentText()
        try:
            scales = parse_scales(self.scale_box.scale_values.text())
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        files, limit, _session = self.scale_box.sweep_files(self.data_files()), self.data.limit(), self.session

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> ScaleSweep:
            with session.lock:
                sets = datasets.load_eval_sets(
                    files, session.tokenizer, limit=limit, max_length=datasets.max_length_for(session.model)
                )
            return sweep_scale(session, adapter, sets, scales, cancel=cancel, report=report)

        job = self.run_cancellable(self.op(f"sweeping {adapter}'s scale", fn).on_success(self.show_sweep))
        if job is not None:
            self.results_tabs.setCurrentIndex(SCALE_PAGE)
        return job

    def show_sweep(self, sweep: ScaleSweep) -> None:
        self.sweep = sweep
        self.scale_box.show_sweep(sweep)
        self.show_message(f"swept {len(sweep.points)} scales in {sweep.seconds:.1f} s", "ok")
        self.update_buttons()

    def apply_best_scale(self) -> Job | None:
        if self.sweep is None:
            return None
        adapter, scale, _session = self.sweep.adapter, self.sweep.best.scale, self.session

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> None:
            session.set_scale(adapter, scale)

        return (
            self.op(f"setting {adapter}'s scale", fn, progress=False)
            .on_success(lambda _: self.show_message(f"{adapter} runs at scale {scale:g} in this session", "ok"))
            .run()
        )

    def merge_at_best_scale(self) -> None:
        if self.sweep is not None:
            self.navigator.use_scale_in_merge(self.sweep.adapter, self.sweep.best.scale)

    # -- report --------------------------------------------------------------------------------------------------------
    def save_report(self) -> None:
        if self.result is None:
            return
        path = self.ask_report_path("Save the evaluation", "evaluation.html")
        if path is not None:
            self.write_report(path)

    def write_report(self, path: Path) -> Job | None:
        from lora_studio.core.report.share import write_report

        assert self.result is not None
        doc = self.result.to_json()
        if self.sweep is not None:
            doc["scale_sweep"] = self.sweep.to_json()

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> Path:
            return write_report(doc, path, overwrite=True)

        return (
            self.op("saving the report", fn, exclusive=False, key="evaluate-report", progress=False)
            .on_success(lambda written: self.show_saved("report", written))
            .run()
        )
