"""What the Compare tab changes on the session's adapters: an adapter's LoRA scale, a weighted combination.

Both are model jobs. A new scale runs the comparison on screen again; a combination becomes a session
adapter, ticked as a column (the Merge tab's preview lands here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from lora_studio.gui.base.jobs import Job
from lora_studio.gui.tabs.compare.host import CompareTab

if TYPE_CHECKING:
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report

T = TypeVar("T")


class AdapterEdits:
    """Scale changes and combinations; ``rerun`` runs the comparison on screen again (after a scale change)."""

    def __init__(self, host: CompareTab, rerun: Callable[[], object]) -> None:
        self.host, self.rerun = host, rerun

    def set_scale(self, adapter: str, scale: float) -> Job | None:
        """Run ``adapter`` at ``scale`` from now on (PEFT's set_scale); the last comparison runs again with it."""

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> None:
            session.set_scale(adapter, scale)

        def done(_result: None) -> None:
            self.host.show_message(f"{adapter} runs at scale {scale:g}", "ok")
            self.rerun()

        return self.host.op(f"setting {adapter}'s scale", fn, progress=False).on_success(done).run()

    def add_combination(
        self, name: str, weights: dict[str, float], combination_type: str = "linear", density: float | None = None
    ) -> Job | None:
        """Create a weighted combination of attached adapters on the session (a job), then tick it as a column."""
        weights = dict(weights)
        variants = self.host.variants

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> None:
            session.register_combination(name, weights, combination_type, density)

        def done(_result: None) -> None:
            variants.unticked.discard(name)
            variants.fill()
            label = " + ".join(f"{a}×{w:g}" for a, w in weights.items())
            self.host.show_message(f"{name} = {combination_type}({label}) is ready to compare", "ok")

        what = f"combining into {name}"
        return self.host.op(what, fn, progress=False).on_success(done).run(f"{what}…")
