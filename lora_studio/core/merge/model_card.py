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
