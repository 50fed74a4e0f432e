"""The Reduce tab: cut an attached adapter to a lower rank and see what the cut keeps and what it costs.

Left: the adapter, its suggested ranks (90/95/99 % of the update's energy, with one rank for every module or
each module at its own), the cut (a rank, or an energy share), the output folder and the data the cost is
measured on. Right: the energy curves (every module's in grey, the adapter's in blue, the chosen cut as a line)
and the result: ranks, parameters, energy kept, and on the data the KL from the original, the Δloss with its
95 % interval and the share of the adapter's gain over the base that is kept. The reduced adapter is attached
to the session, so Compare, Evaluate and Merge see it beside the original.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.io.paths import data_dir
from lora_studio.core.session import SessionState
from lora_studio.gui.jobs import Job, JobRunner
from lora_studio.gui.ops import unique_name
from lora_studio.gui.panel import Panel
from lora_studio.gui.widgets import line_chart

if TYPE_CHECKING:
    from lora_studio.core.reduce import RankPlan, ReducedAdapter, ReductionCost
    from lora_studio.gui.session_model import SessionModel

BY_RANK, BY_ENERGY = "rank", "energy"


class ReducePanel(Panel):
    def __init__(self, runner: JobRunner, session_model: SessionModel, parent: QWidget | None = None) -> None:
        super().__init__(runner, session_model, parent)
        self.plan: RankPlan | None = None
        self.result: tuple[ReducedAdapter, ReductionCost | None] | None = None
        self._plot: Any = None
        self._cut_line: Any = None
        self._drawn = False  # whether the chart shows the current plan
        self._out_is_default = True
        self.chosen_data: list[Path] = []  # none: the adapter's validation set, else the demo sets

        self.adapter_combo = QComboBox()
        self.adapter_combo.setToolTip("an attached LoRA adapter")
        self.suggestions = QTableWidget(0, 4)
        self.suggestions.setHorizontalHeaderLabels(["energy", "one rank", "per module", "parameters"])
        self.suggestions.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.suggestions.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.suggestions.verticalHeader().setVisible(False)
        self.suggestions.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.suggestions.verticalHeader().setDefaultSectionSize(22)
        self.suggestions.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.suggestions.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.suggestions.setFixedHeight(self.suggestions.horizontalHeader().sizeHint().height() + 3 * 22 + 4)
        self.suggestions.setToolTip(
            "the smallest cut keeping 90/95/99 % of the update's energy (Σσ² of each ΔW): one rank for every "
            "module, or each module at its own rank (parameters: one rank / per module). Click a row to use it"
        )

        self.mode_combo = QComboBox()
        self.mode_combo.addItem("one rank for every module", BY_RANK)
        self.mode_combo.addItem("per-module ranks keeping an energy share", BY_ENERGY)
        self.rank_spin = QSpinBox(minimum=1, maximum=1, value=1)
        self.rank_spin.setToolTip("every module keeps its largest k singular directions (never more than it has)")
        self.energy_spin = QDoubleSpinBox(minimum=10.0, maximum=100.0, value=95.0, decimals=1, singleStep=1.0)
        self.energy_spin.setSuffix(" %")
        self.energy_spin.setToolTip("each module keeps the fewest directions holding this share of its energy")
        self.preview = QLabel("")
        self.preview.setWordWrap(True)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("folder for the reduced adapter (created)")
        self.out_edit.setClearButtonEnabled(True)
        self.browse_out_btn = QPushButton("Browse…")
        self.measure_check = QCheckBox("Measure the cost on data")
        self.measure_check.setChecked(True)
        self.measure_check.setToolTip(
            "score the original and the reduced adapter (and the base) on the adapter's validation set, or the demo "
            "sets, in one mixed batch: KL from the original, Δloss with its 95 % interval"
        )
        self.data_label = QLabel("")
        self.data_label.setWordWrap(True)
        self.data_label.setStyleSheet("color: palette(mid);")
        self.data_btn = QPushButton("Data…")
        self.data_btn.setToolTip("measure on other files (JSONL, CSV, Parquet); cancel the dialog for the defaults")

        cut_box = QGroupBox("Cut")
        form = QFormLayout(cut_box)
        form.addRow("Adapter", self.adapter_combo)
        form.addRow(self.suggestions)
        form.addRow("Mode", self.mode_combo)
        target_row = QHBoxLayout()
        target_row.addWidget(QLabel("rank"))
        target_row.addWidget(self.rank_spin)
        target_row.addWidget(QLabel("energy"))
        target_row.addWidget(self.energy_spin)
        target_row.addStretch(1)
        form.addRow("Keep", target_row)
        form.addRow(self.preview)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.browse_out_btn)
        form.addRow("Save to", out_row)
        measure_row = QHBoxLayout()
        measure_row.addWidget(self.measure_check, 1)
        measure_row.addWidget(self.data_btn)
        form.addRow(measure_row)
        form.addRow(self.data_label)

        self.run_btn = QPushButton("Reduce")
        self.run_btn.setDefault(True)
        self.stop_btn = QPushButton("Cancel")
        self.stop_btn.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.stop_btn)
        buttons.addStretch(1)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(cut_box)
        left_layout.addLayout(buttons)
        left_layout.addWidget(self.progress)
        left_layout.addWidget(self.message)
        left_layout.addStretch(1)
        self.progress.hide()

        self.plot_holder = QVBoxLayout()
        self.placeholder = QLabel("Pick an attached adapter: its energy curves show how much each rank keeps.")
        self.placeholder.setWordWrap(True)
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setStyleSheet("color: palette(mid);")
        self.plot_holder.addWidget(self.placeholder, 1)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addLayout(self.plot_holder, 1)
        right_layout.addWidget(self.result_label)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([380, 520])
        left.setMinimumWidth(320)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

        self.adapter_combo.currentIndexChanged.connect(lambda _i: self.read_plan())
        self.suggestions.cellClicked.connect(self._use_suggestion)
        self.mode_combo.currentIndexChanged.connect(lambda _i: self._cut_changed())
        self.rank_spin.valueChanged.connect(lambda _v: self._cut_changed())
        self.energy_spin.valueChanged.connect(lambda _v: self._cut_changed())
        self.out_edit.textEdited.connect(self._out_edited)
        self.browse_out_btn.clicked.connect(self._browse_out)
        self.measure_check.toggled.connect(lambda _on: self.update_buttons())
        self.data_btn.clicked.connect(self._browse_data)
        self.run_btn.clicked.connect(self.run)
        self.stop_btn.clicked.connect(self.stop)
        self.show_state(self.state)

    # -- state -------------------------------------------------------------------------------------------------------
    def adapter_folders(self) -> dict[str, Path]:
        return {name: Path(path) for name, path, _size in self.state.adapters if path and Path(path).is_dir()}

    def show_state(self, state: SessionState) -> None:
        super().show_state(state)
        names = list(self.adapter_folders())
        current = self.adapter_combo.currentText()
        self.adapter_combo.blockSignals(True)
        self.adapter_combo.clear()
        self.adapter_combo.addItems(names)
        if current in names:
            self.adapter_combo.setCurrentText(current)
        self.adapter_combo.blockSignals(False)
        if self.adapter_combo.currentText() != (self.plan.name if self.plan else ""):
            self.read_plan()
        self.update_buttons()

    def update_buttons(self) -> None:
        reason = self.busy_reason or ("" if self.state.loaded else "load a base model first")
        reason = reason or ("" if self.plan is not None else "attach a LoRA adapter first")
        reason = reason or ("" if self.out_edit.text().strip() else "choose where to save the reduced adapter")
        self.set_reasons({self.run_btn: (reason, "write the reduced adapter, attach it and measure the cost")})
        self.stop_btn.setEnabled(self.job is not None)
        self.data_btn.setEnabled(self.measure_check.isChecked())
        for widget in (self.mode_combo, self.rank_spin, self.energy_spin, self.suggestions):
            widget.setEnabled(self.plan is not None)
        self.rank_spin.setVisible(self.mode() == BY_RANK)
        self.energy_spin.setVisible(self.mode() == BY_ENERGY)

    def mode(self) -> str:
        return str(self.mode_combo.currentData())

    # -- the plan ----------------------------------------------------------------------------------------------------
    def read_plan(self) -> Job | None:
        from lora_studio.core.reduce import read_plan

        name = self.adapter_combo.currentText()
        folder = self.adapter_folders().get(name)
        self.plan = None
        if folder is None:
            self._show_plan()
            return None

        def fn(*, cancel, report):
            return read_plan(folder, name=name)

        return (
            self.op(f"reading {name}'s spectra", fn, exclusive=False, key="reduce-plan", progress=False)
            .on_success(self.show_plan)
            .on_failure(self._plan_failed)
            .run()
        )

    def _plan_failed(self, desc: Any) -> None:
        self.show_message(desc.message, "error")
        self._show_plan()

    def show_plan(self, plan: RankPlan) -> None:
        if plan.name != self.adapter_combo.currentText():
            return  # an older read
        self.plan = plan
        self.clear_error()
        self._show_plan()

    def _show_plan(self) -> None:
        plan = self.plan
        table = self.suggestions
        table.setRowCount(0)
        if plan is None:
            self.preview.setText("")
            self.data_label.setText("")
            self.update_buttons()
            return
        self.rank_spin.blockSignals(True)
        self.rank_spin.setMaximum(plan.r)
        suggestions = plan.suggestions()
        self.rank_spin.setValue(next(s.uniform_rank for s in suggestions if s.energy == 0.95))
        self.rank_spin.blockSignals(False)
        table.setRowCount(len(suggestions))
        for r, s in enumerate(suggestions):
            cells = [
                f"{100 * s.energy:g} %",
                str(s.uniform_rank),
                f"≤ {s.per_module_max_rank}",
                f"{_thousands(s.uniform_params)} / {_thousands(s.per_module_params)}",
            ]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                table.setItem(r, c, item)
        self._show_data()
        self._drawn = False
        if self.isVisible():  # else when the tab is first shown: an attach elsewhere does not pay for this chart
            self._draw()
        self._cut_changed()

    def _use_suggestion(self, row: int, column: int) -> None:
        if self.plan is None:
            return
        s = self.plan.suggestions()[row]
        self.mode_combo.setCurrentIndex(1 if column == 2 else 0)
        self.rank_spin.setValue(s.uniform_rank)
        self.energy_spin.setValue(100 * s.energy)

    def ranks(self) -> dict[str, int]:
        assert self.plan is not None
        if self.mode() == BY_RANK:
            return self.plan.ranks(rank=self.rank_spin.value())
        return self.plan.ranks(energy=self.energy_spin.value() / 100)

    def _cut_changed(self) -> None:
        plan = self.plan
        if plan is None:
            return
        from lora_studio.core.reduce.spectrum import rank_text

        ranks = self.ranks()
        params = plan.params_kept(ranks)
        self.preview.setText(
            f"rank {plan.r} → {rank_text(ranks)}: keeps {100 * plan.energy_kept(ranks):.1f} % of the update's energy, "
            f"{params:,} of {plan.params:,} parameters ({100 * params / max(1, plan.params):.0f} %)"
        )
        if self._out_is_default:
            self.out_edit.setText(str(data_dir() / "reduced" / self._suggested_name()))
        if self._cut_line is not None:
            self._cut_line.setValue(max(ranks.values()))
        self.update_buttons()

    def _suggested_name(self) -> str:
        assert self.plan is not None
        if self.mode() == BY_RANK:
            return f"{self.plan.name}-r{self.rank_spin.value()}"
        return f"{self.plan.name}-e{self.energy_spin.value():g}"

    def _out_edited(self, _text: str) -> None:
        self._out_is_default = False
        self.update_buttons()

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the reduced adapter in", self.start_folder("reduce-out"))
        if folder and self.plan is not None:
            self.remember_folder("reduce-out", folder)
            self._out_is_default = False
            self.out_edit.setText(str(Path(folder) / self._suggested_name()))
            self.update_buttons()

    def data_files(self) -> list[Path]:
        from lora_studio.core.evaluate.datasets import default_sets

        if self.chosen_data:
            return list(self.chosen_data)
        return default_sets([self.plan.path]) if self.plan is not None else []

    def set_data_files(self, paths: list[Path]) -> None:
        """Measure on ``paths``; an empty list goes back to the defaults."""
        self.chosen_data = list(paths)
        self._show_data()

    def _browse_data(self) -> None:
        from lora_studio.gui.evaluate_panel import DATA_FILTER

        paths, _ = QFileDialog.getOpenFileNames(self, "Data to measure on", self.start_folder("eval-data"), DATA_FILTER)
        if paths:
            self.remember_folder("eval-data", str(Path(paths[0]).parent))
        self.set_data_files([Path(p) for p in paths])

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._drawn and self.plan is not None:
            self._draw()
            self._cut_changed()

    def _show_data(self) -> None:
        files = self.data_files()
        names = ", ".join(p.name for p in files) or "none found"
        where = "" if self.chosen_data else " (the adapter's validation set, else the demo sets)"
        self.data_label.setText(f"data: {names}{where}")

    def _draw(self) -> None:
        import pyqtgraph as pg

        plan = self.plan
        if plan is None:
            return
        self._drawn = True
        if self._plot is None:
            self._plot = line_chart("rank kept", "energy kept (%)", legend=(-6, -6))
            self.placeholder.hide()
            self.plot_holder.addWidget(self._plot, 1)
        plot = self._plot
        plot.clear()
        # every module's curve in one item, broken by NaN: one item draws in a fraction of the time of hundreds
        xs: list[float] = []
        ys: list[float] = []
        for m in plan.modules:
            xs += [*range(m.r + 1), float("nan")]
            ys += [0.0, *(100 * e for e in m.cumulative()), float("nan")]
        plot.plot(xs, ys, pen=pg.mkPen(color=(150, 150, 150, 90), width=1), connect="finite", name="each module")
        ks = list(range(plan.r + 1))
        plot.plot(
            ks,
            [0.0] + [100 * plan.uniform_energy(k) for k in ks[1:]],
            pen=pg.mkPen("#4c78a8", width=3),
            symbol="o",
            symbolSize=5,
            name="the adapter (one rank everywhere)",
        )
        for target in (90, 95, 99):
            plot.addItem(pg.InfiniteLine(target, angle=0, pen=pg.mkPen("#bbb", width=1, style=Qt.PenStyle.DashLine)))
        self._cut_line = pg.InfiniteLine(self.rank_spin.value(), angle=90, pen=pg.mkPen("#54a24b", width=2))
        plot.addItem(self._cut_line)
        plot.setYRange(0, 101, padding=0)
        plot.setXRange(0, plan.r, padding=0.02)

    # -- the reduction -------------------------------------------------------------------------------------------------
    def run(self) -> Job | None:
        from lora_studio.core.errors import UserError
        from lora_studio.core.evaluate import datasets
        from lora_studio.core.reduce import ReductionCost, reduce_adapter, reduction_cost

        plan = self.plan
        if plan is None:
            return None
        out = Path(self.out_edit.text().strip()).expanduser()
        rank = self.rank_spin.value() if self.mode() == BY_RANK else None
        energy = self.energy_spin.value() / 100 if self.mode() == BY_ENERGY else None
        files = self.data_files() if self.measure_check.isChecked() else []
        name = unique_name(out.name.replace(".", "_").replace(" ", "_") or "reduced", self.adapter_folders())
        session, base = self.session, self.state.base_path

        def fn(*, cancel, report):
            started = time.perf_counter()
            result = reduce_adapter(
                plan,
                out,
                rank=rank,
                energy=energy,
                base_path=Path(base) if base else None,
                cancel=cancel,
                report=report,
            )
            session.attach(result.out, name, activate=False, cancel=cancel, report=report)
            if not files:
                result.seconds = time.perf_counter() - started
                return result, None
            with session.lock:
                sets = datasets.load_eval_sets(files, session.tokenizer)
            if not sets:
                raise UserError("no data to measure on", "untick Measure, or add a validation set to the adapter")
            measured = reduction_cost(session, plan.name, name, sets, cancel=cancel, report=report)
            result.seconds = time.perf_counter() - started  # the cut, the attach and the measurement
            return result, ReductionCost.of(measured, plan.name, name)

        job = self.run_cancellable(self.op(f"reducing {plan.name}", fn).on_success(self.show_result))
        if job is not None:
            self.result_label.setText("")
        return job

    def show_result(self, outcome: tuple[ReducedAdapter, ReductionCost | None]) -> None:
        self.result = outcome
        from lora_studio.core.reduce.spectrum import rank_text

        result, cost = outcome
        lines = [
            f"<b>{result.source}</b>: rank {result.r_before} → {rank_text(result.ranks)}, {result.params_before:,} → "
            f"{result.params_after:,} parameters ({100 * result.params_after / max(1, result.params_before):.0f} %), "
            f"{100 * result.energy_kept:.2f} % of the update's energy kept (least: "
            f"{result.worst_module[0]}, {100 * result.worst_module[1]:.1f} %).",
        ]
        if cost is not None:
            colour = "#c0392b" if cost.clear and cost.delta_loss > 0 else "#2a7a2a"
            lines.append(f"On {cost.tokens} answer tokens: <span style='color:{colour}'>{cost.sentence()}</span>.")
        lines.append(f"Saved to {result.out}; attached as <b>{self._attached_name(result)}</b> beside the original.")
        self.result_label.setText("<br>".join(lines))
        self.show_message(f"reduced {result.source} in {result.seconds:.1f} s", "ok")
        self.marker.emit(f"reduced {result.source}")

    def _attached_name(self, result: ReducedAdapter) -> str:
        return next((n for n, p in self.adapter_folders().items() if p == result.out), result.out.name)


def _thousands(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e3 else str(n)
