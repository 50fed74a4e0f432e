"""The Reduce tab: cut an attached adapter to a lower rank and see what the cut keeps and what it costs.

Left (:mod:`.cut`): the adapter, its suggested ranks (90/95/99 % of the update's energy, with one rank for every
module or each module at its own), the cut (a rank, or an energy share), the output folder and the data the cost
is measured on. Right: the energy curves (:mod:`.chart`: every module's in grey, the adapter's in blue, the chosen
cut as a line) and the result: ranks, parameters, energy kept, and on the data the KL from the original, the
Δloss with its 95 % interval and the share of the adapter's gain over the base that is kept. The reduced adapter
is attached to the session, so Compare, Evaluate and Merge see it beside the original.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from lora_studio.core.io.paths import data_dir, free_path
from lora_studio.core.session import SessionState
from lora_studio.gui.base.file_filters import EVAL_DATA_FILTER
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.ops import unique_name
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.base.widgets import side_by_side
from lora_studio.gui.tabs.reduce.chart import EnergyChart
from lora_studio.gui.tabs.reduce.cut import CutBox

if TYPE_CHECKING:
    from lora_studio.core.errors import ErrorDescription
    from lora_studio.core.reduce import RankPlan, ReducedAdapter, ReductionCost
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.context import TabContext


class ReducePanel(Panel):
    def __init__(self, ctx: TabContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.plan: RankPlan | None = None
        self.result: tuple[ReducedAdapter, ReductionCost | None] | None = None
        self._out_is_default = True
        self.chosen_data: list[Path] = []  # none: the adapter's validation set, else the demo sets
        left = self._build_inputs()
        right = self._build_results()
        self._build_layout(left, right)
        self._connect()
        self.show_state(self.state)

    # -- building ------------------------------------------------------------------------------------------------------
    def _build_inputs(self) -> QWidget:
        """The left column: the Cut box, Reduce / Cancel, the progress bar and the message line."""
        self.cut = CutBox()
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
        left_layout.addWidget(self.cut)
        left_layout.addLayout(buttons)
        left_layout.addWidget(self.progress)
        left_layout.addWidget(self.message)
        left_layout.addStretch(1)
        self.progress.hide()
        left.setMinimumWidth(320)
        return left

    def _build_results(self) -> QWidget:
        """The right side: the energy chart and what the last reduction did."""
        self.chart = EnergyChart()
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.chart, 1)
        right_layout.addWidget(self.result_label)
        return right

    def _build_layout(self, left: QWidget, right: QWidget) -> None:
        splitter = side_by_side(left, right, (380, 520))
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

    def _connect(self) -> None:
        self.cut.adapter_combo.currentIndexChanged.connect(lambda _i: self.read_plan())
        self.cut.cut_changed.connect(self._cut_changed)
        self.cut.out_edit.textEdited.connect(self._out_edited)
        self.cut.browse_out_btn.clicked.connect(self._browse_out)
        self.cut.measure_check.toggled.connect(lambda _on: self.update_buttons())
        self.cut.data_btn.clicked.connect(self._browse_data)
        self.run_btn.clicked.connect(self.run)
        self.stop_btn.clicked.connect(self.stop)

    @property
    def _plot(self) -> Any:
        """The energy chart; None until it is first drawn."""
        return self.chart.plot

    # -- state ---------------------------------------------------------------------------------------------------------
    def adapter_folders(self) -> dict[str, Path]:
        return {name: Path(path) for name, path, _size in self.state.adapters if path and Path(path).is_dir()}

    def show_state(self, state: SessionState) -> None:
        super().show_state(state)
        # the reduction this tab just attached is not the next one to reduce: the choice stays on its source
        self.cut.set_adapters(list(self.adapter_folders()), choose_new=self.job is None)
        if self.cut.adapter_combo.currentText() != (self.plan.name if self.plan else ""):
            self.read_plan()
        self.update_buttons()

    def forget_base(self) -> None:
        """The last base's reduction (its chart, its saved line) is not this one's."""
        super().forget_base()
        if self.job is None:
            self.result = None
            self.result_label.setText("")
            if self._out_is_default:  # named after the last base's adapter
                self.cut.out_edit.setText("")
            if self.chart.plot is not None:
                self.chart.plot.clear()
            self.chart.drawn = False

    def update_buttons(self) -> None:
        reason = self.busy_reason or ("" if self.state.loaded else "load a base model first")
        reason = reason or ("" if self.plan is not None else "attach a LoRA adapter first")
        reason = reason or ("" if self.cut.out_edit.text().strip() else "choose where to save the reduced adapter")
        self.set_reasons({self.run_btn: (reason, "write the reduced adapter, attach it and measure the cost")})
        self.stop_btn.setEnabled(self.job is not None)
        self.cut.update_enabled(self.plan is not None)

    def mode(self) -> str:
        return self.cut.mode()

    # -- the plan ------------------------------------------------------------------------------------------------------
    def read_plan(self) -> Job | None:
        from lora_studio.core.reduce import read_plan

        name = self.cut.adapter_combo.currentText()
        folder = self.adapter_folders().get(name)
        self.plan = None
        if folder is None:
            self._show_plan()
            return None

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> RankPlan:
            return read_plan(folder, name=name)

        return (
            self.op(f"reading {name}'s spectra", fn, exclusive=False, key="reduce-plan", progress=False)
            .on_success(self.show_plan)
            .on_failure(self._plan_failed)
            .run()
        )

    def _plan_failed(self, desc: ErrorDescription) -> None:
        self.show_message(desc.message, "error")
        self._show_plan()

    def show_plan(self, plan: RankPlan) -> None:
        if plan.name != self.cut.adapter_combo.currentText():
            return  # an older read
        self.plan = plan
        self.clear_error()
        self._show_plan()

    def _show_plan(self) -> None:
        plan = self.plan
        if plan is None:
            self.cut.clear_suggestions()
            self.update_buttons()
            return
        self.cut.show_suggestions(plan.suggestions(), plan.r)
        self._show_data()
        self.chart.drawn = False
        if self.isVisible():  # else when the tab is first shown: an attach elsewhere does not pay for this chart
            self.chart.draw(plan, self.cut.rank_spin.value())
        self._cut_changed()

    def ranks(self) -> dict[str, int]:
        assert self.plan is not None
        rank, energy = self.cut.target()
        return self.plan.ranks(rank=rank) if rank is not None else self.plan.ranks(energy=energy)

    def _cut_changed(self) -> None:
        plan = self.plan
        if plan is None:
            return
        from lora_studio.core.reduce.spectrum import rank_text

        ranks = self.ranks()
        params = plan.params_kept(ranks)
        self.cut.preview.setText(
            f"rank {plan.r} → {rank_text(ranks)}: keeps {100 * plan.energy_kept(ranks):.1f} % of the update's energy, "
            f"{params:,} of {plan.params:,} parameters ({100 * params / max(1, plan.params):.0f} %)"
        )
        if self._out_is_default:
            self.cut.out_edit.setText(str(self._suggested_out(data_dir() / "reduced")))
        self.chart.set_cut(max(ranks.values()))
        self.update_buttons()

    def _suggested_out(self, parent: Path) -> Path:
        """``parent/<adapter>-<cut>``, numbered past the folders earlier reductions left there."""
        assert self.plan is not None
        return free_path(parent, f"{self.plan.name}-{self.cut.name_suffix()}")

    def _out_edited(self, _text: str) -> None:
        self._out_is_default = False
        self.update_buttons()

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the reduced adapter in", self.start_folder("reduce-out"))
        if folder and self.plan is not None:
            self.remember_folder("reduce-out", folder)
            self._out_is_default = False
            self.cut.out_edit.setText(str(self._suggested_out(Path(folder))))
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
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Data to measure on", self.start_folder("eval-data"), EVAL_DATA_FILTER
        )
        if paths:
            self.remember_folder("eval-data", str(Path(paths[0]).parent))
        self.set_data_files([Path(p) for p in paths])

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if not self.chart.drawn and self.plan is not None:
            self.chart.draw(self.plan, self.cut.rank_spin.value())
            self._cut_changed()

    def _show_data(self) -> None:
        files = self.data_files()
        names = ", ".join(p.name for p in files) or "none found"
        where = "" if self.chosen_data else " (the adapter's validation set, else the demo sets)"
        self.cut.data_label.setText(f"data: {names}{where}")

    # -- the reduction -------------------------------------------------------------------------------------------------
    def run(self) -> Job | None:
        from lora_studio.core.errors import UserError
        from lora_studio.core.evaluate import datasets
        from lora_studio.core.reduce import ReductionCost, reduce_adapter, reduction_cost

        plan = self.plan
        if plan is None:
            return None
        out = Path(self.cut.out_edit.text().strip()).expanduser()
        rank, energy = self.cut.target()
        files = self.data_files() if self.cut.measure_check.isChecked() else []
        name = unique_name(out.name.replace(".", "_").replace(" ", "_") or "reduced", self.adapter_folders())
        _session, base = self.session, self.state.base_path

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> tuple[ReducedAdapter, ReductionCost | None]:
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
                sets = datasets.load_eval_sets(
                    files, session.tokenizer, max_length=datasets.max_length_for(session.model)
                )
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
        self._cut_changed()  # a suggested output now names the folder just written: the next one moves on

    def _attached_name(self, result: ReducedAdapter) -> str:
        return next((n for n, p in self.adapter_folders().items() if p == result.out), result.out.name)
