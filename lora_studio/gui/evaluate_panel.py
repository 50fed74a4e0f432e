"""The Evaluate tab: score the ticked variants on datasets, see where each changed, sweep an adapter's scale.

Left: the data files (by default the attached adapters' validation sets, else the demo sets), the variants
(the base, every attached adapter and combination, the merged folders loaded in Compare, GGUF files added
here) and the reference. Right: the summary per set (loss, perplexity, accuracy, KL, Δloss with its 95 %
interval, regressions), the per-example table (sortable by the change; a double-click opens the example in
Compare with every variant), and the scale sweep (loss and KL from the base against the scale; "Use in Merge"
hands the best scale to the Merge tab). "Save report…" writes the evaluation as HTML, Markdown, JSONL or CSV.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.errors import UserError
from lora_studio.core.session import SessionState
from lora_studio.gui.jobs import Job, JobRunner
from lora_studio.gui.panel import Panel
from lora_studio.gui.widgets import line_chart

if TYPE_CHECKING:
    from lora_studio.core.evaluate.run import EvaluationResult
    from lora_studio.core.evaluate.scale import ScaleSweep
    from lora_studio.gui.session_model import SessionModel

DATA_FILTER = "Evaluation data (*.jsonl *.json *.csv *.parquet);;All files (*)"
GGUF_FILTER = "GGUF files (*.gguf);;All files (*)"
ALL_SETS = "all sets"
REGRESSION = QColor("#f8d7da")
BETTER = QColor("#d4edda")


class _Number(QTableWidgetItem):
    """A table cell that sorts by its value, not its text."""

    def __init__(self, value: float | None, text: str) -> None:
        super().__init__(text)
        self.setData(Qt.ItemDataRole.UserRole, float("-inf") if value is None else value)
        self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        return float(self.data(Qt.ItemDataRole.UserRole)) < float(other.data(Qt.ItemDataRole.UserRole))


ROW_HEIGHT = 22  # compact rows: the base and four variants fit the summary at 1280×720


def _read_only(table: QTableWidget) -> None:
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(ROW_HEIGHT)
    table.setAlternatingRowColors(True)


class EvaluatePanel(Panel):
    def __init__(
        self,
        runner: JobRunner,
        session_model: SessionModel,
        *,
        merged_models: Callable[[], Mapping[str, Any]] = dict,
        open_in_compare: Callable[[str, list[str]], None] | None = None,
        use_scale: Callable[[str, float], None] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(runner, session_model, parent)
        self.merged_models = merged_models  # Compare's merged folders: column name -> BesideModel
        self.open_in_compare = open_in_compare
        self.use_scale_in_merge = use_scale
        self.result: EvaluationResult | None = None
        self.sweep: ScaleSweep | None = None
        self.ggufs: dict[str, Path] = {}
        self._data_is_default = True
        self._plot: Any = None

        # -- left: data, variants, reference, run ----------------------------------------------------------------
        self.data_list = QListWidget()
        self.data_list.setToolTip("the evaluation files: JSONL, CSV, Parquet or save_to_disk folders")
        self.data_list.setMaximumHeight(96)
        self.add_data_btn = QPushButton("Add file…")
        self.remove_data_btn = QPushButton("Remove")
        self.default_data_btn = QPushButton("Defaults")
        self.default_data_btn.setToolTip("the attached adapters' validation sets, else the demo validation sets")
        self.limit_spin = QSpinBox(minimum=0, maximum=100000, value=0)
        self.limit_spin.setSpecialValueText("all rows")
        self.limit_spin.setToolTip("evaluate the first N rows of each file (all rows: 0)")
        data_box = QGroupBox("Data")
        data_grid = QGridLayout(data_box)
        data_grid.addWidget(self.data_list, 0, 0, 1, 4)
        data_grid.addWidget(self.add_data_btn, 1, 0)
        data_grid.addWidget(self.remove_data_btn, 1, 1)
        data_grid.addWidget(self.default_data_btn, 1, 2)
        data_grid.addWidget(self.limit_spin, 1, 3)

        self.variant_list = QListWidget()
        self.variant_list.setToolTip("tick the variants to score; every adapter runs in one mixed batch")
        self.add_gguf_btn = QPushButton("Add GGUF…")
        self.add_gguf_btn.setToolTip("score a GGUF export in llama.cpp (needs llama-cpp-python)")
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("KL and Δloss are measured against this variant")
        variants_box = QGroupBox("Variants")
        variants_layout = QVBoxLayout(variants_box)
        variants_layout.addWidget(self.variant_list, 1)
        ref_row = QHBoxLayout()
        ref_row.addWidget(QLabel("Reference"))
        ref_row.addWidget(self.reference_combo, 1)
        ref_row.addWidget(self.add_gguf_btn)
        variants_layout.addLayout(ref_row)

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
        left_layout.addWidget(data_box)
        left_layout.addWidget(variants_box, 1)
        left_layout.addLayout(buttons)
        left_layout.addWidget(self.progress)
        left_layout.addWidget(self.message)
        self.progress.hide()

        # -- right: summary, examples, scale ------------------------------------------------------------------------
        self.set_combo = QComboBox()
        self.set_combo.addItem(ALL_SETS)
        self.set_combo.setToolTip("the summary of one set, or of every set together")
        self.verdict = QLabel("Pick the data and the variants, then Evaluate.")
        self.verdict.setWordWrap(True)
        self.summary_table = QTableWidget(0, 8)
        self.summary_table.setHorizontalHeaderLabels(
            ["variant", "loss", "perplexity", "accuracy", "KL", "Δloss", "95 % CI", "regressions"]
        )
        _read_only(self.summary_table)
        self.summary_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.summary_table.setToolTip(
            "loss: mean cross-entropy per answer token (nats); accuracy: the variant's greedy token is the answer's; "
            "KL: from the reference; Δloss: against the reference, with the paired bootstrap's 95 % interval "
            "(green/red: the interval excludes 0); regressions: examples clearly worse than the base"
        )
        summary_page = QWidget()
        summary_layout = QVBoxLayout(summary_page)
        set_row = QHBoxLayout()
        set_row.addWidget(QLabel("Set"))
        set_row.addWidget(self.set_combo, 1)
        summary_layout.addLayout(set_row)
        summary_layout.addWidget(self.summary_table, 1)
        self.by_set_table = QTableWidget(0, 0)
        _read_only(self.by_set_table)
        self.by_set_table.setToolTip(
            "Δloss against the reference on each set (nats per answer token); green: better, red: worse, "
            "with the 95 % interval excluding 0; plain: no clear change"
        )
        self.by_set_table.hide()
        summary_layout.addWidget(self.by_set_table, 1)
        summary_layout.addWidget(self.verdict)

        self.examples_table = QTableWidget(0, 0)
        _read_only(self.examples_table)
        self.examples_table.setSortingEnabled(True)
        self.examples_table.setWordWrap(False)
        self.examples_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.examples_table.setToolTip(
            "one row per example: each variant's loss, and its change against the reference; red: a regression "
            "(clearly worse than the base). Click a header to sort; double-click to open the example in Compare"
        )
        self.examples_note = QLabel("")
        self.examples_note.setWordWrap(True)  # a long line here would widen the whole window
        self.examples_note.setStyleSheet("color: palette(mid);")
        examples_page = QWidget()
        examples_layout = QVBoxLayout(examples_page)
        examples_layout.addWidget(self.examples_table, 1)
        examples_layout.addWidget(self.examples_note)

        self.scale_adapter = QComboBox()
        self.scale_values = QLineEdit("0:1.5:0.25")
        self.scale_values.setToolTip("scales to try: 0, 0.5, 1 or a range start:stop:step")
        self.sweep_btn = QPushButton("Sweep")
        self.sweep_btn.setToolTip("evaluate the adapter at each scale on the data (PEFT's set_scale, no merge)")
        self.best_label = QLabel("")
        self.best_label.setWordWrap(True)
        self.apply_scale_btn = QPushButton("Apply to session")
        self.apply_scale_btn.setToolTip("run the adapter at the best scale in Compare and evaluations")
        self.merge_scale_btn = QPushButton("Use in Merge")
        self.merge_scale_btn.setToolTip("tick the adapter alone in the Merge tab at the best scale")
        self.plot_holder = QVBoxLayout()
        self.plot_placeholder = QLabel(
            "Sweep plots the adapter's loss and its KL from the base against its scale (0 is the base, 1 the "
            "adapter as trained), on the data at the left."
        )
        self.plot_placeholder.setWordWrap(True)
        self.plot_placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.plot_placeholder.setStyleSheet("color: palette(mid);")
        self.plot_holder.addWidget(self.plot_placeholder, 1)
        scale_page = QWidget()
        scale_layout = QVBoxLayout(scale_page)
        scale_row = QHBoxLayout()
        scale_row.addWidget(QLabel("Adapter"))
        scale_row.addWidget(self.scale_adapter, 1)
        scale_row.addWidget(QLabel("Scales"))
        scale_row.addWidget(self.scale_values, 1)
        scale_row.addWidget(self.sweep_btn)
        scale_layout.addLayout(scale_row)
        scale_layout.addLayout(self.plot_holder, 1)
        best_row = QHBoxLayout()
        best_row.addWidget(self.best_label, 1)
        best_row.addWidget(self.apply_scale_btn)
        best_row.addWidget(self.merge_scale_btn)
        scale_layout.addLayout(best_row)

        self.results_tabs = QTabWidget()
        self.results_tabs.addTab(summary_page, "Summary")
        self.results_tabs.addTab(examples_page, "Examples")
        self.results_tabs.addTab(scale_page, "Scale")

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(self.results_tabs)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([300, 600])
        left.setMinimumWidth(260)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

        self.add_data_btn.clicked.connect(self.browse_data)
        self.remove_data_btn.clicked.connect(self._remove_data)
        self.default_data_btn.clicked.connect(self.use_default_data)
        self.add_gguf_btn.clicked.connect(self.browse_gguf)
        self.variant_list.itemChanged.connect(lambda _item: self._variants_changed())
        self.run_btn.clicked.connect(self.run)
        self.stop_btn.clicked.connect(self.stop)
        self.save_btn.clicked.connect(self.save_report)
        self.set_combo.currentIndexChanged.connect(lambda _i: self._show_summary())
        self.examples_table.cellDoubleClicked.connect(self._open_example)
        self.sweep_btn.clicked.connect(self.run_sweep)
        self.apply_scale_btn.clicked.connect(self.apply_best_scale)
        self.merge_scale_btn.clicked.connect(self.merge_at_best_scale)
        self.show_state(self.state)

    # -- state -----------------------------------------------------------------------------------------------------
    def show_state(self, state: SessionState) -> None:
        super().show_state(state)
        self.refresh_variants()
        if self._data_is_default:
            self.use_default_data()
        adapters = [name for name, _path, _size in state.adapters]
        current = self.scale_adapter.currentText()
        self.scale_adapter.blockSignals(True)
        self.scale_adapter.clear()
        self.scale_adapter.addItems(adapters)
        if current in adapters:
            self.scale_adapter.setCurrentText(current)
        self.scale_adapter.blockSignals(False)
        self.update_buttons()

    def available_variants(self) -> list[tuple[str, str]]:
        """(name, kind) of every variant that can be ticked now."""
        if not self.state.loaded:
            return []
        out = [("base", "base")]
        out += [(name, "adapter") for name, _path, _size in self.state.adapters]
        out += [(name, "merged") for name in self.merged_models()]
        out += [(name, "gguf") for name in self.ggufs]
        return out

    def refresh_variants(self) -> None:
        ticked = {self.variant_list.item(i).text(): self.variant_list.item(i).checkState() for i in range(self.count)}
        self.variant_list.blockSignals(True)
        self.variant_list.clear()
        for name, kind in self.available_variants():
            item = QListWidgetItem(name)
            item.setData(Qt.ItemDataRole.UserRole, kind)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(ticked.get(name, Qt.CheckState.Checked))
            item.setToolTip(
                {"merged": "a merged folder loaded in Compare", "gguf": str(self.ggufs.get(name))}.get(kind, kind)
            )
            self.variant_list.addItem(item)
        self.variant_list.blockSignals(False)
        self._variants_changed()

    @property
    def count(self) -> int:
        return self.variant_list.count()

    def ticked(self) -> list[tuple[str, str]]:
        items = [self.variant_list.item(i) for i in range(self.count)]
        return [(i.text(), i.data(Qt.ItemDataRole.UserRole)) for i in items if i.checkState() == Qt.CheckState.Checked]

    def set_ticked(self, names: list[str]) -> None:
        for i in range(self.count):
            item = self.variant_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

    def _variants_changed(self) -> None:
        names = [name for name, _kind in self.ticked()]
        current = self.reference_combo.currentText()
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItems(names)
        if current in names:
            self.reference_combo.setCurrentText(current)
        elif "base" in names:
            self.reference_combo.setCurrentText("base")
        self.reference_combo.blockSignals(False)
        self.update_buttons()

    def update_buttons(self) -> None:
        running = self.job is not None
        reason = self.busy_reason or ("" if self.state.loaded else "load a base model first")
        run_reason = reason or ("" if self.ticked() else "tick at least one variant")
        run_reason = run_reason or ("" if self.data_files() else "add an evaluation file")
        sweep_reason = reason or ("" if self.scale_adapter.count() else "attach an adapter first")
        sweep_reason = sweep_reason or ("" if self.data_files() else "add an evaluation file")
        best = "" if self.sweep is not None else "sweep a scale first"
        self.set_reasons(
            {
                self.run_btn: (run_reason, "score every ticked variant on the data"),
                self.sweep_btn: (sweep_reason, "evaluate the adapter at each scale"),
                self.save_btn: ("" if self.result else "evaluate first", "save the evaluation as a report"),
                self.apply_scale_btn: (best or reason, "run the adapter at the best scale in the session"),
                self.merge_scale_btn: (best, "tick the adapter alone in the Merge tab at the best scale"),
            }
        )
        self.stop_btn.setEnabled(running)

    # -- data --------------------------------------------------------------------------------------------------------
    def data_files(self) -> list[Path]:
        return [Path(self.data_list.item(i).text()) for i in range(self.data_list.count())]

    def set_data_files(self, paths: list[Path], *, default: bool = False) -> None:
        self.data_list.clear()
        for path in paths:
            self.data_list.addItem(str(path))
        self._data_is_default = default
        self.update_buttons()

    def use_default_data(self) -> None:
        from lora_studio.core.evaluate.datasets import default_sets

        folders = [Path(path) for _name, path, _size in self.state.adapters if Path(path).is_dir()]
        self.set_data_files(default_sets(folders), default=True)

    def browse_data(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Evaluation data", self.start_folder("eval-data"), DATA_FILTER)
        if paths:
            self.remember_folder("eval-data", str(Path(paths[0]).parent))
            files = [] if self._data_is_default else self.data_files()
            self.set_data_files(files + [Path(p) for p in paths if Path(p) not in files])

    def _remove_data(self) -> None:
        for item in self.data_list.selectedItems():
            self.data_list.takeItem(self.data_list.row(item))
        self._data_is_default = False
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
        from lora_studio.core.evaluate.run import GgufVariant

        merged = self.merged_models()
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
        reference = self.reference_combo.currentText() or None
        limit = self.limit_spin.value() or None
        session = self.session

        def fn(*, cancel, report):
            with session.lock:
                sets = datasets.load_eval_sets(files, session.tokenizer, limit=limit)
            return evaluate(session, columns, sets, reference=reference, cancel=cancel, report=report)

        what = f"evaluating {len(columns)} variants"
        job = self.run_cancellable(self.op(what, fn).on_success(self.show_result))
        if job is not None:
            self.show_message(f"{what}…")
        return job

    def show_result(self, result: EvaluationResult) -> None:
        self.result = result
        self.set_combo.blockSignals(True)
        self.set_combo.clear()
        self.set_combo.addItem(ALL_SETS)
        if len(result.sets) > 1:
            self.set_combo.addItems([s.name for s in result.sets])
        self.set_combo.blockSignals(False)
        self._show_summary()
        self._show_by_set()
        self._show_examples()
        how = "in one mixed-adapter batch" if result.mixed_batch else f"one at a time ({result.fallback_reason})"
        count = sum(len(s.examples) for s in result.sets)
        if result.fallback_reason is None and not result.mixed_batch:
            how = "alone"
        self.show_message(f"{len(result.variants)} variants on {count} examples {how}, {result.seconds:.1f} s", "ok")
        self.marker.emit("evaluated")
        self.update_buttons()

    def _show_summary(self) -> None:
        result = self.result
        if result is None:
            return
        dataset = None if self.set_combo.currentText() in ("", ALL_SETS) else self.set_combo.currentText()
        rows = [s for s in result.summary if s.dataset == dataset]
        table = self.summary_table
        table.setRowCount(len(rows))
        for r, s in enumerate(rows):
            cells = [
                QTableWidgetItem(s.name),
                _Number(s.loss, f"{s.loss:.4f}"),
                _Number(s.perplexity, f"{s.perplexity:.2f}"),
                _Number(s.accuracy, f"{100 * s.accuracy:.1f} %"),
                _Number(s.kl, "-" if s.kl is None else f"{s.kl:.4f}"),
                _Number(s.delta_loss, "-" if s.delta_loss is None else f"{s.delta_loss:+.4f}"),
                QTableWidgetItem("-" if s.delta_ci is None else f"[{s.delta_ci.low:+.3f}, {s.delta_ci.high:+.3f}]"),
                _Number(s.regressions, str(s.regressions)),
            ]
            if s.significant and s.delta_loss is not None:
                colour = BETTER if s.delta_loss < 0 else REGRESSION
                for cell in cells[5:7]:
                    cell.setBackground(colour)
            for c, cell in enumerate(cells):
                table.setItem(r, c, cell)
        self.verdict.setText(verdict(result, dataset))

    def _show_by_set(self) -> None:
        """Which variant helps on which set, and by how much: Δloss per (variant, set)."""
        result = self.result
        table = self.by_set_table
        if result is None or len(result.sets) < 2:
            table.hide()
            return
        others = [n for n in result.names if n != result.reference]
        sets = [s.name for s in result.sets]
        cells = {(s.name, s.dataset): s for s in result.summary}
        table.clear()
        table.setRowCount(len(others))
        table.setColumnCount(len(sets))
        table.setHorizontalHeaderLabels([f"Δloss on {name}" for name in sets])
        table.setVerticalHeaderLabels(others)
        table.verticalHeader().setVisible(True)
        for r, name in enumerate(others):
            for c, dataset in enumerate(sets):
                summary = cells[(name, dataset)]
                delta = summary.delta_loss or 0.0
                item = _Number(delta, f"{delta:+.3f}")
                if summary.significant:
                    item.setBackground(BETTER if delta < 0 else REGRESSION)
                if summary.delta_ci is not None:
                    item.setToolTip(f"95 % interval [{summary.delta_ci.low:+.3f}, {summary.delta_ci.high:+.3f}]")
                table.setItem(r, c, item)
        table.resizeColumnsToContents()
        table.show()

    def _show_examples(self) -> None:
        result = self.result
        if result is None:
            return
        others = [n for n in result.names if n != result.reference]
        headers = ["set", "row", "prompt", f"{result.reference} loss"]
        headers += [f"{n} Δloss" for n in others] + [f"{n} KL" for n in others]
        table = self.examples_table
        table.setSortingEnabled(False)
        table.clear()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        examples = result.examples
        table.setRowCount(len(examples))
        for r, e in enumerate(examples):
            ref = result.scores[result.reference][r]
            prompt = QTableWidgetItem(" ".join(e.prompt.split())[:120])
            prompt.setToolTip(f"{e.prompt}\n\n— answer —\n{e.answer}")
            prompt.setData(Qt.ItemDataRole.UserRole, r)  # the example behind the row, whatever the sort
            cells: list[QTableWidgetItem] = [
                QTableWidgetItem(e.dataset),
                _Number(e.source_row, str(e.source_row)),
                prompt,
                _Number(ref.loss, f"{ref.loss:.3f}"),
            ]
            regressed = result.regressed.get(e.index, [])
            for n in others:
                delta = result.scores[n][r].loss - ref.loss
                cell: QTableWidgetItem = _Number(delta, f"{delta:+.3f}")
                if n in regressed:
                    cell.setBackground(REGRESSION)
                    cell.setToolTip(f"a regression: {n} is clearly worse than the base here")
                cells.append(cell)
            for n in others:
                kl = result.scores[n][r].mean_kl
                cells.append(_Number(kl, "-" if kl is None else f"{kl:.3f}"))
            for c, cell in enumerate(cells):
                table.setItem(r, c, cell)
        table.setSortingEnabled(True)
        if others:
            table.sortItems(4, Qt.SortOrder.DescendingOrder)  # the largest increase of the first variant first
        table.resizeColumnsToContents()
        table.setColumnWidth(2, 280)  # the prompt: its whole text is the cell's tooltip
        total = sum(len(v) for v in result.regressed.values())
        self.examples_note.setText(
            f"{len(examples)} examples; {total} regression(s) (loss above the base's by more than "
            f"{_regression_nats():g} nats/token). Double-click an example to open it in Compare."
        )

    def _open_example(self, row: int, _column: int) -> None:
        result = self.result
        item = self.examples_table.item(row, 2)
        if result is None or item is None or self.open_in_compare is None:
            return
        example = result.examples[int(item.data(Qt.ItemDataRole.UserRole))]
        kinds = dict(self.available_variants())
        names = [n for n in result.names if kinds.get(n) in ("base", "adapter", "merged")]
        self.open_in_compare(example.prompt, names)

    # -- scale -------------------------------------------------------------------------------------------------------
    def run_sweep(self) -> Job | None:
        from lora_studio.core.evaluate import datasets
        from lora_studio.core.evaluate.scale import parse_scales, sweep_scale

        adapter = self.scale_adapter.currentText()
        try:
            scales = parse_scales(self.scale_values.text())
        except UserError as exc:
            self.show_message(str(exc), "error")
            return None
        files, limit, session = self.data_files(), self.limit_spin.value() or None, self.session

        def fn(*, cancel, report):
            with session.lock:
                sets = datasets.load_eval_sets(files, session.tokenizer, limit=limit)
            return sweep_scale(session, adapter, sets, scales, cancel=cancel, report=report)

        job = self.run_cancellable(self.op(f"sweeping {adapter}'s scale", fn).on_success(self.show_sweep))
        if job is not None:
            self.results_tabs.setCurrentIndex(2)
        return job

    def show_sweep(self, sweep: ScaleSweep) -> None:
        import pyqtgraph as pg

        self.sweep = sweep
        if self._plot is None:
            plot = line_chart("scale", "loss (nats/token)")
            self.plot_placeholder.hide()
            self.plot_holder.addWidget(plot, 1)
            self._plot = plot
        plot = self._plot
        plot.clear()
        xs = [p.scale for p in sweep.points]
        plot.plot(
            xs, [p.loss for p in sweep.points], pen=pg.mkPen("#4c78a8", width=2), symbol="o", symbolSize=6, name="loss"
        )
        plot.plot(
            xs,
            [p.kl_from_base for p in sweep.points],
            pen=pg.mkPen("#e45756", width=2),
            symbol="t",
            symbolSize=6,
            name="KL from base",
        )
        plot.plot(
            xs, [sweep.base_loss] * len(xs), pen=pg.mkPen("#777", width=1, style=Qt.PenStyle.DashLine), name="base loss"
        )
        best = sweep.best
        plot.addItem(pg.InfiniteLine(best.scale, angle=90, pen=pg.mkPen("#54a24b", width=1)))
        self.best_label.setText(
            f"{sweep.adapter}: best scale {best.scale:g} — loss {best.loss:.4f} (at 1: "
            f"{_loss_at(sweep, 1.0)}; base {sweep.base_loss:.4f}), KL from base {best.kl_from_base:.4f}"
        )
        self.show_message(f"swept {len(sweep.points)} scales in {sweep.seconds:.1f} s", "ok")
        self.update_buttons()

    def apply_best_scale(self) -> Job | None:
        if self.sweep is None:
            return None
        adapter, scale, session = self.sweep.adapter, self.sweep.best.scale, self.session

        def fn(*, cancel, report):
            session.set_scale(adapter, scale)

        return (
            self.op(f"setting {adapter}'s scale", fn, progress=False)
            .on_success(lambda _: self.show_message(f"{adapter} runs at scale {scale:g} in this session", "ok"))
            .run()
        )

    def merge_at_best_scale(self) -> None:
        if self.sweep is not None and self.use_scale_in_merge is not None:
            self.use_scale_in_merge(self.sweep.adapter, self.sweep.best.scale)

    # -- report ------------------------------------------------------------------------------------------------------
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

        def fn(*, cancel, report):
            return write_report(doc, path, overwrite=True)

        return (
            self.op("saving the report", fn, exclusive=False, key="evaluate-report", progress=False)
            .on_success(lambda written: self.show_message(f"report saved: {written}", "ok"))
            .run()
        )


def _regression_nats() -> float:
    from lora_studio.core.evaluate.stats import REGRESSION_NATS

    return REGRESSION_NATS


def _loss_at(sweep: ScaleSweep, scale: float) -> str:
    point = next((p for p in sweep.points if p.scale == scale), None)
    return "not tried" if point is None else f"{point.loss:.4f}"


def verdict(result: EvaluationResult, dataset: str | None) -> str:
    """One line per variant: better, worse or no clear change against the reference, and by how much."""
    lines = []
    for s in result.summary:
        if s.dataset != dataset or s.delta_loss is None:
            continue
        change = f"{s.delta_loss:+.3f} nats/token"
        if s.delta_ci is None:
            word = "changed by"
        elif not s.significant:
            word = "no clear change"
            change = f"({change}, the interval includes 0)"
        else:
            word = "better than" if s.delta_loss < 0 else "worse than"
        tail = f" {result.reference}: {change}" if word != "no clear change" else f" from {result.reference} {change}"
        lines.append(f"{s.name}: {word}{tail}")
    where = dataset or "all sets"
    return f"On {where}: " + "; ".join(lines) if lines else ""
