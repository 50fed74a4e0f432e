"""The README.md model card of a merged model: what went in, how, and whether it was verified."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from lora_studio.core.io import card_format
from lora_studio.core.io.hashing import file_sha256

__all__ = ["file_sha256", "front_matter", "render"]


TAGS = ("lora", "merged", "peft", "lora-studio")


def front_matter(provenance: dict) -> list[str]:
    """The Hub's model-card metadata: the base (its hub id when known), the library, tags, the license when known."""
    base = provenance["base"]
    return card_format.front_matter(
        base_model=base.get("hub_id"), library_name="transformers", license=base.get("license"), tags=TAGS
    )


def _single(adapters: list[dict]) -> str:
    weight = adapters[0]["weight"] if adapters else 1.0
    return "none (single adapter)" if weight == 1.0 else f"none (single adapter at scale {weight:g})"


def _blocks(kind: str) -> str:
    from lora_studio.core.model.quantize import BITS, BLOCK_SIZE_4BIT

    return f", blocks of {BLOCK_SIZE_4BIT}" if BITS.get(kind) == 4 else ""


def quantised_base_card(q: dict | None) -> list[str]:
    """What the merge of an adapter trained on a quantised base (QLoRA) chose, and the figures it chose by."""
    if not q:
        return []
    how = "measured" if q["asked"] == "auto" else "chosen by the user"
    lines = [
        "",
        "## Quantised base (QLoRA)",
        "",
        f"The adapter learned on the base quantised as {q['quantize']}{_blocks(q['quantize'])} (computing in "
        f"{q['compute_dtype']}). "
        f"Merged into the **{q['chosen']}** weights ({how}): "
        + (
            "W = dequant(Wq) + ΔW, the weights the adapter was trained on."
            if q["chosen"] == "dequantized"
            else "W = W16 + ΔW, the checkpoint's own weights."
        )
        + f" Nothing is re-quantised to {q['quantize']}. The verification below compares the output with the "
        "adapter on exactly these weights.",
    ]
    if q.get("saved_quantised"):
        lines += [
            "",
            f"The quantised weights are those saved in `{q['saved_quantised']}`; the original ones those of the "
            "full-precision folder it was quantised from (the base named above).",
        ]
    if q["kl"]:
        kl = ", ".join(f"{name} {value:.4g}" for name, value in q["kl"].items())
        lines += ["", f"Mean KL(adapter on the quantised base ‖ candidate) over {q['tokens']} positions: {kl}."]
    if q["layers"]:
        rows = sorted(q["layers"], key=lambda x: x["ratio"], reverse=True)[:12]
        lines += [
            "",
            f"‖W16 − dequant(Wq)‖ / ‖ΔW‖ per adapted layer: median {q['median_gap_ratio']:.3g}, "
            f"{q['layers_gap_above_update']} of {len(q['layers'])} layers above 1 (the largest below):",
            "",
            "| layer | ‖W16 − dequant(Wq)‖ | ‖ΔW‖ | ratio |",
            "|---|---|---|---|",
        ]
        lines += [f"| `{x['module']}` | {x['gap']:.4g} | {x['update']:.4g} | {x['ratio']:.3g} |" for x in rows]
    return lines


def render(provenance: dict) -> str:
    """Markdown with YAML front matter (Hub-style) and the full provenance as a JSON block."""
    base = provenance["base"]
    lines = front_matter(provenance)
    lines += [
        "",
        f"# {Path(provenance['output']).name}",
        "",
        f"A merged model: {base['label']} with {len(provenance['adapters'])} LoRA adapter(s) folded into its weights "
        f"by LoRA Studio {provenance['tool_version']}. "
        "Load it like any causal LM; it needs neither PEFT nor the adapters.",
        "",
        "## Provenance",
        "",
        f"- **Base**: `{base['path']}` ({base.get('hashed', 'config.json')} sha256 "
        f"`{base.get('config_sha256') or 'n/a'}`)",
        f"- **Dtype**: {provenance['dtype']}",
        f"- **Engine**: {provenance['engine']}",
        f"- **Combination**: {provenance.get('combination') or _single(provenance['adapters'])}"
        + (f", density {provenance['density']}" if provenance.get("density") is not None else ""),
        "",
        "| adapter | weight | r | alpha | rsLoRA | DoRA | weights sha256 | path |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in provenance["adapters"]:
        lines.append(
            f"| {a['name']} | {a['weight']:g} | {a['r']} | {a['lora_alpha']:g} | "
            f"{'yes' if a['use_rslora'] else 'no'} | {'yes' if a['use_dora'] else 'no'} | "
            f"`{a['sha256']}` | `{a['path']}` |"
        )
    lines += quantised_base_card(provenance.get("quantized_base"))
    lines += ["", "## Verification", ""]
    v = provenance.get("verification")
    if v is None:
        lines.append("Not verified (skipped at the user's request).")
    else:
        lim = v["thresholds"]
        lines += [
            f"**{v['status'].upper()}** — the saved folder, loaded with plain `AutoModelForCausalLM`, "
            f"against base + adapter through PEFT on {v['prompts']} prompts, {v['tokens_compared']} greedy tokens:",
            "",
            f"- max |Δlogit|: {v['max_abs_logit_diff']:.4g} (limit {lim[0]:g})",
            f"- mean KL(adapter ‖ merged): {v['mean_kl']:.4g} (limit {lim[1]:g})",
            f"- greedy-token agreement: {v['greedy_agreement']:.1%} (limit {lim[2]:.0%})",
        ]
    out = provenance["output"]
    lines += [
        "",
        "## Serving",
        "",
        "vLLM serves the folder as it is; for llama.cpp or Ollama, export a GGUF "
        "(`lora-studio export`, or the Merge tab's GGUF formats):",
        "",
        "```sh",
        f"vllm serve {shlex.quote(str(out))}",
        f"lora-studio export {shlex.quote(str(out))} --type q8_0 --out {shlex.quote(str(out) + '.q8_0.gguf')}",
        "```",
        "",
        "## Machine-readable provenance",
        "",
        "```json",
        json.dumps(provenance, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)
