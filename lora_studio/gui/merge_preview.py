"""What the Merge tab hands the Compare tab: the ticked combination as a column, the saved folder against its
adapters. The Compare tab is a collaborator the Merge panel is given (:class:`ComparePreview`), never reached
through the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from lora_studio.core.errors import UserError
from lora_studio.gui.jobs import Job

if TYPE_CHECKING:
    from lora_studio.gui.merge_panel import MergePanel


class ComparePreview(Protocol):
    """What the Merge tab asks of the Compare tab (the ComparePanel is one)."""

    def add_combination_variant(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None: ...

    def add_merged_variant(self, path: str, against: tuple[str, ...] = ()) -> Job | None: ...


def preview_in_compare(panel: MergePanel) -> None:
    """The ticked adapters' weighted combination, made on the session, as a column of the Compare tab."""
    if panel.compare is None:
        panel.show_message("the Compare panel is not available", "warn")
        return
    rows = panel.checked_rows()
    if len(rows) < 2:
        panel.show_message("tick two or more adapters to preview a combination", "warn")
        return
    combination = panel.adapters.combination()
    weights = {r.name: r.weight for r in rows}
    try:
        panel.compare.add_combination_variant(
            panel.variant_name(combination), weights, combination, panel.adapters.density_for(combination)
        )
    except UserError as exc:
        panel.show_message(str(exc), "error")
        return
    panel.show_compare_tab()


def compare_merged(panel: MergePanel) -> None:
    """The last saved folder loaded beside the session, ticked against the adapter(s) it was merged from."""
    if panel.result is None:
        return
    if panel.compare is None:
        panel.show_message("the Compare panel is not available", "warn")
        return
    try:
        sources = tuple(a["name"] for a in panel.result.provenance.get("adapters", []))
        panel.compare.add_merged_variant(str(panel.result.out), against=sources)  # ticks these two, adapter as ref
    except UserError as exc:
        panel.show_message(str(exc), "error")
        return
    panel.show_compare_tab()
