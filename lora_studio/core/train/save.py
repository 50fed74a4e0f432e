"""Writing a trained adapter: the PEFT folder (converted for OLoRA/PiSSA), its loss CSV and its training card.

Everything goes into a temporary sibling of the output folder that replaces it in one step when complete
(:func:`lora_studio.core.io.atomic.atomic_output_dir`), as a merge does.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio import __version__
from lora_studio.core.adapters.files import SIDECAR_NAME
from lora_studio.core.adapters.training_log import LOSS_CSV
from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_dir, exchange_folders, replace_text
from lora_studio.core.io.card_format import front_matter
from lora_studio.core.io.hashing import tree_sha256
from lora_studio.core.model.identity import base_fingerprint, base_license, hub_id
from lora_studio.core.model.quantize import quantization_record
from lora_studio.core.system.versions import versions
from lora_studio.core.tasks import CancelToken
from lora_studio.core.train.records import INITIAL_ADAPTER, RunRecord, TrainRequest
from lora_studio.core.train.settings import ADVICE, CONVERTED_INITS

if TYPE_CHECKING:
    from lora_studio.core.train.data import PreparedData

CARD = "README.md"
INIT_NAMES = {"default": "LoRA", "gaussian": "LoRA (gaussian init)", "olora": "OLoRA", "pissa": "PiSSA"}


def save_trained_adapter(
    request: TrainRequest,
    out: Path,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    record: RunRecord,
    *,
    keep: str,
    kept_step: int,
    cancel: CancelToken,
    overwrite: bool | None = None,
) -> Path:
    settings = request.settings
    converted = settings.init in CONVERTED_INITS
    base_id = hub_id(request.base)
    with atomic_output_dir(out, overwrite=request.overwrite if overwrite is None else overwrite) as tmp:
        config = model.peft_config["default"]
        # the adapter names its base as the Hub knows it when it can, else the folder it was trained on
        config.base_model_name_or_path = base_id or str(request.base.file)
        if converted:
            model.save_pretrained(
                str(tmp), path_initial_model_for_weight_conversion=str(request.checkpoints / INITIAL_ADAPTER)
            )
        else:
            model.save_pretrained(str(tmp))
        cancel.raise_if_cancelled()
        provenance = _provenance(request, data, record, keep, kept_step, base_id)
        (tmp / LOSS_CSV).write_text(loss_csv(record), "utf-8")
        (tmp / SIDECAR_NAME).write_text(json.dumps(provenance, indent=2) + "\n", "utf-8")
        (tmp / CARD).write_text(render_card(provenance), "utf-8")
    return out


def swap_with_alternative(adapter: Path, alternative: Path) -> None:
    """Put the other trained weights (best or last) in the adapter's folder, and the ones it held where those were.

    Each folder's card and sidecar describe its own weights, so after the swap both still tell the truth."""
    for path in (adapter, alternative):
        if not (path / SIDECAR_NAME).is_file():
            raise UserError(f"{path} is not a trained adapter folder", "train again, or pick the folder by hand")
    exchange_folders(adapter, alternative)


def add_baseline(adapter: Path, record: RunRecord, baseline: RunRecord) -> None:
    """Put the full fine-tuning baseline's numbers into a saved adapter's card, sidecar and loss CSV."""
    sidecar = adapter / SIDECAR_NAME
    provenance = json.loads(sidecar.read_text("utf-8"))
    provenance["baseline"] = baseline.to_json()
    replace_text(adapter / LOSS_CSV, loss_csv(record, baseline))
    replace_text(sidecar, json.dumps(provenance, indent=2) + "\n")
    replace_text(adapter / CARD, render_card(provenance))


def loss_csv(record: RunRecord, baseline: RunRecord | None = None) -> str:
    """step, train_loss, val_loss, lr, elapsed_s, tokens_per_s (+ the baseline's losses): what the inspector reads."""
    columns = ["step", "train_loss", "val_loss", "lr", "elapsed_s", "tokens_per_s"]
    rows: dict[int, dict[str, Any]] = {r["step"]: dict(r) for r in record.rows}
    if baseline is not None:
        columns += ["baseline_train_loss", "baseline_val_loss"]
        for r in baseline.rows:
            row = rows.setdefault(r["step"], {"step": r["step"]})
            row["baseline_train_loss"], row["baseline_val_loss"] = r.get("train_loss"), r.get("val_loss")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({k: _cell(rows[step].get(k)) for k in columns})
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _provenance(
    request: TrainRequest, data: PreparedData, record: RunRecord, keep: str, kept_step: int, base_id: str | None
) -> dict[str, Any]:
    settings = request.settings
    base = request.base
    return {
        "tool": f"lora-studio {__version__} train",
        "init_lora_weights": settings.init,  # what the inspector shows ("OLoRA, converted")
        "converted_to_lora": settings.init in CONVERTED_INITS,
        "trained_rank": settings.r,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {
            "label": base.label,
            "path": str(base.file),
            "hub_id": base_id,
            "license": base_license(base),
            **base_fingerprint(base),
            # QLoRA: the weights the adapter learned on were these, not the checkpoint's (see merge --merge-into)
            "quantization": quantization_record(settings.quantize, settings.dtype) if settings.quantize else None,
        },
        "data": {
            "train_file": str(data.train_file),
            "train_sha256": tree_sha256(data.train_file),
            "val_file": str(data.val_file) if data.val_file else None,
            "val_sha256": tree_sha256(data.val_file) if data.val_file else None,
            "shape": data.shape,
            "text_format": data.text_format,
            "train_rows": len(data.train),
            "val_rows": len(data.val),
            "rows_cut_at_max_length": data.rows_too_long,
            "warnings": data.warnings,
        },
        "settings": settings.to_json(),
        "result": {**record.to_json(), "kept": keep, "kept_step": kept_step, "overfitting": record.overfitting or None},
        "versions": dict(versions()),
    }


TEXT_FORMATS = {
    "chat_template": "each row rendered with the tokenizer's chat template; prompt it the same way",
    "plain": "prompt and answer joined as written (the base has no chat template; TRL's convention): prompt it with "
    "the bare prompt, no template and no separator",
}


def _quantized_base(base: dict[str, Any]) -> str:
    q = base.get("quantization")
    if not q:
        return ""
    blocks = f", blocks of {q['block_size']}, computing in {q['compute_dtype']}" if q.get("block_size") else ""
    return (
        f" QLoRA: the base was quantised on load ({q['method']} {q['type']}{blocks}); the adapter learned on those "
        "weights."
    )


def _loss(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render_card(p: dict[str, Any]) -> str:
    settings, result, data, base = p["settings"], p["result"], p["data"], p["base"]
    init = INIT_NAMES.get(settings["init"], settings["init"])
    tags = ["lora", "peft", "sft", "trl", "lora-studio", *([settings["init"]] if settings["init"] != "default" else [])]
    lines = front_matter(base_model=base["hub_id"], library_name="peft", license=base["license"], tags=tags)
    converted = (
        f" Trained as {init} (rank {settings['r']}) and saved converted to a plain LoRA of rank {2 * settings['r']}, "
        "which applies to the unmodified base."
        if p["converted_to_lora"]
        else ""
    )
    lines += [
        "",
        f"# {init} adapter for {base['label']}",
        "",
        f"Trained by {p['tool']} with TRL's SFTTrainer on {data['train_rows']} rows of "
        f"`{Path(data['train_file']).name}`.{converted}{_quantized_base(base)} Load it with PEFT "
        "(`PeftModel.from_pretrained(base, folder)`) or attach it in LoRA Studio.",
        "",
        "## Result",
        "",
        "| | value |",
        "|---|---|",
        f"| steps | {result['steps']} |",
        f"| kept | {result['kept']} (step {result['kept_step']}) |",
        f"| final training loss | {_loss(result['final_train_loss'])} |",
        f"| final validation loss | {_loss(result['final_val_loss'])} |",
        f"| best validation loss | {_loss(result['best_val_loss'])} (step {result['best_step']}) |",
        f"| time | {result['seconds']:.1f} s ({result['tokens_per_s'] or 'n/a'} tokens/s) |",
        f"| trainable parameters | {result['trainable_params']:,} ({result['trainable_percent']} % of the model) |",
        f"| peak memory (process RSS) | {result['peak_rss_bytes'] / 1024**2:,.0f} MiB |",
    ]
    if result.get("overfitting"):
        lines += ["", f"**Warning**: {result['overfitting']}."]
    baseline = p.get("baseline")
    if baseline:
        lines += [
            "",
            "## Full fine-tuning baseline",
            "",
            "Every weight trained on the same data and steps (at a tenth of the learning rate), not saved:",
            "",
            "| run | trainable parameters | % of base | best validation loss | time | peak memory |",
            "|---|---|---|---|---|---|",
            _baseline_row("LoRA", result),
            _baseline_row("full", baseline),
        ]
    lines += [
        "",
        "## Data",
        "",
        f"- training: `{data['train_file']}` (sha256 `{data['train_sha256']}`), {data['train_rows']} rows, "
        f"shape {data['shape']}",
        f"- validation: `{data['val_file']}` (sha256 `{data['val_sha256']}`), {data['val_rows']} rows"
        if data["val_file"]
        else f"- validation: {data['val_rows']} rows held out of the training file "
        f"({settings['val_fraction']:.0%}, seed {settings['seed']})",
        f"- text: {TEXT_FORMATS.get(data.get('text_format', 'chat_template'), data.get('text_format'))}",
        *[f"- note: {w}" for w in data["warnings"]],
        "",
        "## Base",
        "",
        f"- {base['label']}: `{base['path']}` ({base.get('hashed', 'config.json')} sha256 `{base['config_sha256']}`)"
        + (f", Hub id `{base['hub_id']}`" if base["hub_id"] else ""),
        "",
        "## Settings",
        "",
        "| setting | value | what it does |",
        "|---|---|---|",
        *[f"| {k} | {v} | {ADVICE.get(k, '')} |" for k, v in settings.items()],
        "",
        "## Versions",
        "",
        *[f"- {name}: {version}" for name, version in p["versions"].items()],
        "",
    ]
    return "\n".join(lines)


def _baseline_row(name: str, r: dict[str, Any]) -> str:
    return (
        f"| {name} | {r['trainable_params']:,} | {r['trainable_percent']} | {_loss(r['best_val_loss'])} | "
        f"{r['seconds']:.1f} s | {r['peak_rss_bytes'] / 1024**2:,.0f} MiB |"
    )
