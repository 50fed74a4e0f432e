"""The Compare tab's runs: one or several prompts through every ticked variant, in one model job.

The job (stream.run_comparison) streams tokens into a :class:`DeltaBuffer`; the tab's flush timer draws them
through :meth:`ComparisonRuns.flush` into the columns (results.py). The finished run goes to the columns, to
the Share button and out through :attr:`ComparisonRuns.finished`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QLabel

from lora_studio.core.errors import UserError
from lora_studio.core.generation.generate import GenerationSettings, validate
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.tabs.compare.host import CompareTab
from lora_studio.gui.tabs.compare.results import CompareResults
from lora_studio.gui.tabs.compare.share import ShareActions
from lora_studio.gui.tabs.compare.stream import DeltaBuffer, RunOutcome, run_comparison

if TYPE_CHECKING:
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report

T = TypeVar("T")


class ComparisonRuns(QObject):
    """Starts a comparison of some prompts, draws what it streams into ``results``, says how it went in ``note``."""

    finished = Signal(object)  # the RunOutcome of a run that finished

    def __init__(
        self,
        host: CompareTab,
        results: CompareResults,
        note: QLabel,
        share: ShareActions,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.host, self.results, self.note, self.share = host, results, note, share
        self.buffer = DeltaBuffer()  # the last run's

    def check(self, prompts: list[str], settings: GenerationSettings) -> bool:
        """Whether a run of ``prompts`` may start; if not, the reason is in the message line."""
        host = self.host
        try:
            if not host.state.base:
                raise UserError("load a base model first", "pick one on the left")
            if not host.variants.ticked():
                raise UserError("no variants are ticked", "tick at least one variant")
            for number, prompt in enumerate(prompts, start=1):
                try:
                    validate(settings, prompt)
                except UserError as exc:
                    if len(prompts) == 1:
                        raise
                    raise UserError(f"prompt {number}: {exc.message}", exc.hint) from exc
        except UserError as exc:
            host.show_message(str(exc), "error")
            return False
        return True

    def start(self, prompts: list[str]) -> Job | None:
        """Compare ``prompts`` through the ticked variants; the job, or None after saying why."""
        host = self.host
        settings = host.settings()
        ticked = host.variants.ticked()
        if not self.check(prompts, settings):
            return None
        reference = host.variants.reference()
        variants = host.variants.core_variants(ticked)
        buffer = DeltaBuffer()
        mixed = not host.decoding.one_at_a_time.isChecked()

        def fn(session: Session, *, cancel: CancelToken, report: Report) -> RunOutcome:
            return run_comparison(
                session, variants, prompts, settings, reference, buffer, mixed=mixed, cancel=cancel, report=report
            )

        def done(outcome: RunOutcome) -> None:
            self.share.shown = (outcome.result, variants)
            self._done(outcome)

        what = f"comparing {len(variants)} variants" + (f" on {len(prompts)} prompts" if len(prompts) > 1 else "")
        job = host.op(what, fn).on_end(self._ended).on_success(done).on_cancel(self._cancelled).run()
        if job is None:
            return None
        self.buffer = buffer
        host.job = job
        self.results.start_run(prompts, ticked)
        mode = (
            "greedy"
            if not settings.do_sample
            else f"sampling T={settings.temperature:g} top-p={settings.top_p:g} seed={settings.seed}"
        )
        self.note.setText(f"{mode}, up to {settings.max_new_tokens} new tokens")
        host.show_message(f"{what}…")
        host.start_streaming()
        host.update_buttons()
        return job

    def rerun(self) -> Job | None:
        """The comparison on screen, again (an adapter's scale changed); None while a job runs."""
        if self.share.shown is None or self.host.job is not None:
            return None
        return self.start([p.prompt for p in self.share.shown[0].prompts])

    def flush(self) -> None:
        """Draw what the run streamed since the last tick."""
        self.results.add_streamed(self.buffer.drain_prompts())

    def _ended(self) -> None:
        self.host.stop_streaming()  # the last tokens drawn
        self.host.job = None
        self.results.end_run()

    def _done(self, outcome: RunOutcome) -> None:
        self.results.show_outcome(outcome)
        result = outcome.result
        reference = result.prompts[0].divergence.reference
        on = f" on {len(result.prompts)} prompts" if len(result.prompts) > 1 else ""
        self.host.show_message(f"compared {len(result.variants)} variants{on} against {reference}", "ok")
        self.finished.emit(outcome)
        self.host.update_buttons()

    def _cancelled(self) -> None:
        self.note.setText(f"stopped after {max((c.tokens for c in self.host.columns), default=0)} tokens per column")
        self.host.show_message("comparison stopped", "warn")
