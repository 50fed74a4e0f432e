"""The Merge tab's result and its actions: the verification badge and numbers of the last merge, its model card
(the desktop's app, else a dialog inside the app), its folder; and saving the ticked adapters' weighted
combination as a PEFT adapter folder instead of merging it (core.merge.save_combination, one model job).

The actions take the Merge tab they act for (a :class:`~lora_studio.gui.tabs.merge.host.MergeTab`): its last
``result``, its replaceable ``open_url`` / ``confirm_overwrite`` / ``ask_adapter_folder``, its message line and
its jobs.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.export import MLX_FORMATS, ExportResult
from lora_studio.core.export.bundle import MAKE_BASE_COMMAND
from lora_studio.core.merge import MergeResult, SavedCombination, save_combination
from lora_studio.core.system.memory import format_bytes
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.widgets import ask_yes_no

if TYPE_CHECKING:
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.tabs.merge.host import MergeTab

BADGES = {
    "pass": (
        "✔ verified",
        "color: white; background: #2a7a2a; padding: 3px 8px; border-radius: 4px; font-weight: bold;",
    ),
    "warn": ("⚠ check", "color: white; background: #c06000; padding: 3px 8px; border-radius: 4px; font-weight: bold;"),
    "fail": (
        "✖ differs",
        "color: white; background: #b02020; padding: 3px 8px; border-radius: 4px; font-weight: bold;",
    ),
    "skipped": ("saved, not checked", "color: white; background: #777; padding: 3px 8px; border-radius: 4px;"),
    None: ("saved, not verified", "color: white; background: #777; padding: 3px 8px; border-radius: 4px;"),
}


class ResultBox(QGroupBox):
    """The verification badge and numbers of the last merge, where it was saved, and what to do with it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Result", parent)
        self.badge = QLabel("")
        self.badge.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.numbers = QLabel("")
        self.numbers.setWordWrap(True)
        self.numbers.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.saved_label = QLabel("")
        self.saved_label.setWordWrap(True)
        self.saved_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.card_btn = QPushButton("Open model card")
        self.folder_btn = QPushButton("Open folder")
        self.compare_merged_btn = QPushButton("Compare merged vs adapter")
        self.write_base_btn = QPushButton("Write the base GGUF")
        self.write_base_btn.setToolTip(
            "an adapter-only file is served on its base as a GGUF: write the base alone (f16) where the serving "
            "notes' commands expect it"
        )
        self.write_base_btn.hide()
        badge_row = QHBoxLayout()
        badge_row.addWidget(self.badge)
        badge_row.addWidget(self.numbers, 1)
        buttons = QHBoxLayout()
        for b in (self.card_btn, self.folder_btn, self.compare_merged_btn, self.write_base_btn):
            buttons.addWidget(b)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addLayout(badge_row)
        layout.addWidget(self.saved_label)
        layout.addLayout(buttons)
        self.hide()

    def show_result(self, result: MergeResult) -> None:
        """``result``: core.merge MergeResult (its verification may be None when verification was off)."""
        v = result.verification
        text, style = BADGES[v.status if v is not None else None]
        self.badge.setText(text)
        self.badge.setStyleSheet(style)
        if v is not None:
            limits = v.thresholds
            self.numbers.setText(
                f"max |Δlogit| {v.max_abs_logit_diff:.3g} (≤ {limits[0]:g}) · mean KL {v.mean_kl:.3g} "
                f"(≤ {limits[1]:g}) · greedy agreement {v.greedy_agreement:.0%} (≥ {limits[2]:.0%}) "
                f"over {v.tokens_compared} tokens, {v.dtype}"
            )
            self.numbers.setToolTip(
                "the saved folder, loaded with plain AutoModelForCausalLM, against base + adapter "
                "through PEFT on the same tokens"
            )
        else:
            self.numbers.setText("verification was off")
        target = result.quantized_base
        qlora = ""
        if target is not None:  # an adapter trained on a quantised base: the weights chosen, and why
            ratios = target.to_json()
            qlora = (
                f"<br>QLoRA ({target.quantize}): {html.escape(target.summary())}; ‖W16 − dequant(Wq)‖ / ‖ΔW‖ median "
                f"{ratios['median_gap_ratio'] or 0:.3g}, {ratios['layers_gap_above_update']} of "
                f"{len(target.layers)} layers above 1 (the table is in the model card)"
            )
        self.saved_label.setText(
            f"Saved <b>{html.escape(str(result.out))}</b> — {result.engine} engine, {result.dtype}, "
            f"{len(result.files)} shard(s), {format_bytes(result.bytes_written)} in "
            f"{result.seconds:.1f} s{qlora}"
        )
        self.compare_merged_btn.show()
        self.write_base_btn.hide()
        self.card_btn.setText("Open model card")
        self.show()

    def show_export(self, result: ExportResult) -> None:
        """``result``: core.export ExportResult: the badge is llama.cpp's own run against the adapter model."""
        v = result.verification
        text, style = BADGES[v.status]
        self.badge.setText(text)
        self.badge.setStyleSheet(style)
        mlx = result.format in MLX_FORMATS
        engine = "mlx-lm" if mlx else "llama.cpp"
        if v.status == "skipped" or v.thresholds is None:  # a run in the runtime always has its thresholds
            self.numbers.setText(f"not run in {engine}: {v.reason}")
        else:
            agreement, kl = v.thresholds
            template = v.template.status if v.template is not None else "none"
            self.numbers.setText(
                f"{engine} vs the adapter: greedy agreement {v.greedy_agreement:.0%} (≥ {agreement:.0%}) · "
                f"top-k KL {v.mean_top_k_kl:.2g} (≤ {kl:g}) over {v.tokens_compared} tokens, {v.type}"
                + ("" if mlx else f" · chat template & stop tokens: {template}")
                + (f" — {v.reason}" if v.reason else "")
            )
        self.numbers.setToolTip(
            "the base with the adapter folder run by mlx-lm against base + adapter in transformers (PEFT) on the "
            "same tokens"
            if mlx
            else "the GGUF run by llama.cpp (llama-cpp-python) against base + adapter in transformers on the same "
            "tokens; the chat template embedded in the GGUF tokenised by llama.cpp against the Hugging Face one"
        )
        lines = [
            f"Saved <b>{result.out}</b> — {result.format}, {result.type}, {format_bytes(result.bytes_written)} "
            f"in {result.seconds:.1f} s"
        ]
        if result.quantized_base is not None:
            lines.append(f"QLoRA ({result.quantized_base.quantize}): {html.escape(result.quantized_base.summary())}")
        if result.carried is not None:
            carried = result.carried
            mark = {"carried": "✔", "washed out": "⚠"}.get(carried.status, "·")
            lines.append(f"{mark} Adapter in the {result.type} weights: {html.escape(carried.summary())}")
        if v.sample:
            lines.append(
                f"“{html.escape(v.sample['prompt'])}” → adapter: <i>{html.escape(v.sample['adapter'])}</i> · "
                f"{engine}: <i>{html.escape(v.sample.get('llama_cpp') or v.sample.get('mlx_lm') or '')}</i>"
            )
        base_written = result.base_to_write is not None and result.base_to_write.exists()
        if result.bundle is not None:
            for label, line in result.bundle.commands.items():
                if label == MAKE_BASE_COMMAND and base_written:
                    continue  # written since (the button below): what is left to run is serving it
                lines.append(f"<b>{label}</b>: <code>{html.escape(line)}</code>")
        self.saved_label.setText("<br>".join(lines))
        self.card_btn.setText("Open the adapter's README" if mlx else "Open serving notes")
        self.compare_merged_btn.hide()
        self.write_base_btn.setVisible(result.base_to_write is not None and not base_written)
        self.show()


def result_card(result: MergeResult | ExportResult) -> Path:
    """The README of a merge's folder, or of an export's serving bundle."""
    if isinstance(result, ExportResult) and result.bundle is not None:
        return Path(result.bundle.folder) / "README.md"  # for an mlx-lm adapter: the folder itself
    return Path(result.out) / "README.md"


def result_folder(result: MergeResult | ExportResult) -> Path:
    out = Path(result.out)
    return out.parent if out.is_file() else out


def card_markdown(text: str) -> str:
    """A model card for QTextBrowser.setMarkdown: its YAML front matter as a code block (Markdown would read
    ``key: value`` followed by ``---`` as a heading)."""
    if text.startswith("---\n"):
        head, sep, body = text[4:].partition("\n---\n")
        if sep:
            return f"```yaml\n{head}\n```\n\n{body}"
    return text


class CardDialog(QDialog):
    """A model card shown inside the app, read-only, rendered as Markdown; "Open with…" hands the file to the
    desktop's app for it."""

    def __init__(
        self, path: Path, parent: QWidget | None = None, open_external: Callable[[], object] | None = None
    ) -> None:
        super().__init__(parent)
        self.path = path
        what = "Serving notes" if path.parent.name.endswith(".serve") else "Model card"
        self.setWindowTitle(f"{what} — {path.parent.name.removesuffix('.serve')}")
        self.browser = QTextBrowser()
        self.browser.setOpenExternalLinks(False)
        self.browser.setReadOnly(True)
        try:
            text = path.read_text("utf-8", errors="replace")
        except OSError as exc:
            text = f"Cannot read {path}: {exc.strerror or exc}"
        self.text = text
        self.browser.setMarkdown(card_markdown(text))
        self.path_label = QLabel(str(path))
        self.path_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.path_label.setStyleSheet("color: palette(mid);")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        self.external_btn = buttons.addButton("Open with…", QDialogButtonBox.ButtonRole.ActionRole)
        self.external_btn.setToolTip("the desktop's app for Markdown files, where there is one")
        self.external_btn.setVisible(open_external is not None)
        if open_external is not None:
            self.external_btn.clicked.connect(lambda: open_external())
        layout = QVBoxLayout(self)
        layout.addWidget(self.browser, 1)
        layout.addWidget(self.path_label)
        layout.addWidget(buttons)
        self.resize(760, 560)


# -- the result's actions ----------------------------------------------------------------------------------------------
def open_card(panel: MergeTab) -> None:
    """The card inside the app: the desktop's opener cannot say whether an app opened the file (xdg-open with no
    app for Markdown reports success and shows nothing), so the dialog offers it as a button instead."""
    if panel.result is None:
        return
    panel.show_card(result_card(panel.result))


def show_card(panel: MergeTab, card: Path, parent: QWidget) -> CardDialog:
    """The model card in a read-only dialog, rendered as Markdown (not modal: the window stays usable)."""
    if panel.card_dialog is not None:
        panel.card_dialog.close()
        panel.card_dialog.deleteLater()
    dialog = CardDialog(card, parent, open_external=lambda: panel.open_path(card))
    panel.card_dialog = dialog
    dialog.show()
    return dialog


def open_folder(panel: MergeTab) -> None:
    if panel.result is None:
        return
    panel.open_path(result_folder(panel.result))


# -- save the combination as an adapter --------------------------------------------------------------------------------
def ask_adapter_folder(parent: QWidget, start: Path) -> Path | None:
    path, _ = QFileDialog.getSaveFileName(parent, "Save the combination as an adapter folder", str(start))
    return Path(path) if path else None


def save_as_adapter(panel: MergeTab) -> Job | None:
    """Ask for a folder and save the ticked adapters' weighted combination there as a PEFT adapter (no merge)."""
    rows = panel.checked_rows()
    if len(rows) < 2:
        panel.show_message("tick two or more adapters to save their combination", "warn")
        return None
    if panel.plan_error:
        panel.show_message(panel.plan_error, "error")
        return None
    combination = panel.adapters.combination()
    density = panel.adapters.density_for(combination)
    out_dir = panel.out_path()
    start_dir = out_dir.parent if out_dir is not None else Path(panel.state.base_path or Path.home()).parent
    out = panel.ask_adapter_folder(start_dir / panel.variant_name(combination))
    if out is None:
        return None
    overwrite = False
    if out.is_dir() and any(out.iterdir()):
        if not panel.confirm_overwrite(out):
            panel.show_message(f"kept {out} as it is; nothing was written", "info")
            return None
        overwrite = True
    elif out.is_dir():
        overwrite = True  # an empty folder: nothing to lose
    names, weights = [r.name for r in rows], [r.weight for r in rows]

    def run(session: Session, *, cancel: CancelToken, report: Report) -> SavedCombination:
        return save_combination(
            session,
            names,
            weights,
            combination,
            out,
            density=density,
            overwrite=overwrite,
            cancel=cancel,
            report=report,
        )

    def saved(result: SavedCombination) -> None:
        panel.show_message(
            f"saved the {result.combination} combination (rank {result.rank}) as the adapter folder {result.out}; "
            "attach it in the Adapters tab",
            "ok",
        )
        panel.log_line.emit(f"saved a {result.combination} combination as the adapter {result.out}", "info")

    def ended() -> None:
        panel.save_job = None

    job = (
        panel.op(f"saving the {combination} combination as an adapter", run)
        .on_success(saved)
        .on_end(ended)
        .run(f"saving the {combination} combination of {len(rows)} adapters into {out}…")
    )
    panel.save_job = job
    return job


def ask_overwrite(parent: QWidget, path: Path) -> bool:
    """Yes: replace the non-empty folder ``path`` (a merge's output, or a saved combination's)."""
    return ask_yes_no(
        parent,
        "Overwrite?",
        f"Overwrite {path}?\n\nIts contents are replaced when the merge completes; until then it stays as it is.",
    )


def merged_lines(result: MergeResult) -> tuple[str, str, str]:
    """A finished merge in words: (the message line, its kind, the Log's line)."""
    v = result.verification
    if v is None or v.status == "pass":
        return f"saved {result.out}", "ok", f"merged into {result.out}: {v.summary() if v else 'not verified'}"
    message = (
        f"saved {result.out}, but the merged model differs more than expected for {v.dtype}: "
        "see the numbers above and the model card"
    )
    return message, "warn", f"merged into {result.out}: {v.summary()}"


def exported_lines(result: ExportResult) -> tuple[str, str, str]:
    """A finished GGUF export in words: (the message line, its kind, the Log's line)."""
    v = result.verification
    passed = v.status == "pass"
    message = f"saved {result.out}" + ("" if passed else f" — verification {v.status}: {v.reason or v.summary()}")
    log = f"exported {result.out}: {v.summary()}"
    if result.carried is not None and result.carried.status != "not measured":
        log += f"; {result.carried.summary()}"
    if result.carried is not None and result.carried.status == "washed out":
        suggestion = f" (try {result.carried.suggestion})" if result.carried.suggestion else ""
        message += f" — {len(result.carried.washed_out)} tensors barely carry the adapter{suggestion}"
        passed = False
    return message, "ok" if passed else "warn", log
