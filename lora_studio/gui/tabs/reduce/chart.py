"""The Reduce tab's energy chart: every module's cumulative energy curve, the adapter's, and the chosen cut.

:class:`EnergyChart` takes a :class:`~lora_studio.core.reduce.RankPlan` (:meth:`EnergyChart.draw`) and the rank
of the cut (:meth:`EnergyChart.set_cut`); until the first plan it shows a placeholder line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from lora_studio.gui.base.widgets import line_chart

if TYPE_CHECKING:
    from lora_studio.core.reduce import RankPlan

TARGETS = (90, 95, 99)  # the energy shares marked across the chart (%)


class EnergyChart(QWidget):
    """Energy kept against the rank kept: grey per module, blue for one rank everywhere, green at the cut."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plot: Any = None  # the chart, made on the first draw
        self.cut_line: Any = None
        self.drawn = False  # whether the chart shows the current plan
        self.plot_holder = QVBoxLayout(self)
        self.plot_holder.setContentsMargins(0, 0, 0, 0)
        self.placeholder = QLabel("Pick an attached adapter: its energy curves show how much each rank keeps.")
        self.placeholder.setWordWrap(True)
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setStyleSheet("color: palette(mid);")
        self.plot_holder.addWidget(self.placeholder, 1)

    def draw(self, plan: RankPlan, cut: int) -> None:
        """Draw ``plan``'s curves with the cut at rank ``cut``."""
        import pyqtgraph as pg

        self.drawn = True
        if self.plot is None:
            self.plot = line_chart("rank kept", "energy kept (%)")
            self.placeholder.hide()
            self.plot_holder.addWidget(self.plot, 1)
        plot = self.plot
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
        for target in TARGETS:
            plot.addItem(pg.InfiniteLine(target, angle=0, pen=pg.mkPen("#bbb", width=1, style=Qt.PenStyle.DashLine)))
        self.cut_line = pg.InfiniteLine(cut, angle=90, pen=pg.mkPen("#54a24b", width=2))
        plot.addItem(self.cut_line)
        plot.setYRange(0, 101, padding=0)
        plot.setXRange(0, plan.r, padding=0.02)

    def set_cut(self, rank: int) -> None:
        """Move the cut's line (once drawn) to ``rank``."""
        if self.cut_line is not None:
            self.cut_line.setValue(rank)
