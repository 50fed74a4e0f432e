"""What the Merge tab hands the Compare tab: the ticked combination as a column, the saved folder against its
adapters. The Compare tab is a collaborator the Merge panel is given (a
:class:`~lora_studio.gui.tabs.merge.host.ComparePreview`), never reached through the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_studio.core.errors import UserError
from lora_studio.core.merge import MergeResult

if TYPE_CHECKING:
    from lora_studio.gui.tabs.merge.host import MergeTab


def preview_in_compare(panel: MergeTab) -> None:
    """The ticked adapters' weighted combination, made on the session, as a column of the Compare tab."""
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


def compare_merged(panel: MergeTab) -> None:
    """The last saved folder loaded beside the session, ticked against the adapter(s) it was merged from."""
    result = panel.result
    if not isinstance(result, MergeResult):  # nothing merged yet, or a GGUF (the Compare tab runs transformers)
        return
    try:
        sources = tuple(a["name"] for a in result.provenance.get("adapters", []))
        panel.compare.add_merged_variant(str(result.out), against=sources)  # ticks these two, adapter as ref
    except UserError as exc:
        panel.show_message(str(exc), "error")
        return
    panel.show_compare_tab()
