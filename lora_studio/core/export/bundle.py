"""The serving bundle written beside an export: how to run it in Ollama, llama.cpp's server and vLLM.

``<export>.serve/`` holds an Ollama ``Modelfile`` (FROM the file; TEMPLATE translated from the
chat template where it is one of the families Ollama's template language is written for here,
ChatML, Llama 3 and Mistral [INST]; otherwise Ollama reads the template embedded in the GGUF;
``PARAMETER stop`` for each stop token; the template's default system prompt as SYSTEM), and a
README.md with the commands: ``llama-server`` (merged, or base + ``--lora``), the same through
llama-cpp-python's server, ``ollama create``, and vLLM for a Hugging Face folder or PEFT adapter.
Paths are absolute, so each line runs as given from any folder.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.generation.chat_template import apply_chat_template
from lora_studio.core.io.atomic import atomic_output_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_studio.core.export.serving_plan import ServingPlan

CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL = (
    '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ if and $.System (eq .Content (index $.Messages 0)'
    '.Content) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]{{ else if eq .Role "assistant" }} '
    "{{ .Content }}</s>{{ end }}{{ end }}"
)


# vLLM's LoRAConfig takes --max-lora-rank from this list only (vllm/config/lora.py, MaxLoRARanks)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


MAKE_BASE_COMMAND = "the base as a GGUF, once"  # the bundle's command that writes an adapter-only file's base


def vllm_max_lora_rank(saved_rank: int | None) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``saved_rank`` (its largest rank as
    saved: OLoRA/PiSSA save 2r); vLLM's own default (16) when the rank is unknown, its largest past 512."""
    if not saved_rank:
        return 16
    return next((rank for rank in VLLM_MAX_LORA_RANKS if rank >= saved_rank), VLLM_MAX_LORA_RANKS[-1])


def saved_rank(adapter: Path) -> int:
    """The largest rank an adapter folder holds as saved: ``r``, or a larger one in ``rank_pattern``."""
    from lora_studio.core.adapters.files import read_adapter_config

    config = read_adapter_config(adapter)
    return max([config.r, *(int(rank) for rank in config.rank_pattern.values())])


def base_gguf_for(source_path: Path, out: Path) -> Path:
    """Where an adapter-only export's bundle expects its base as a GGUF when none was given: an f16 one beside
    the adapter's file, named after the base."""
    return out.with_name(f"{source_path.name}.f16.gguf")


@dataclass(frozen=True)
class ServingBundle:
    folder: Path
    family: str | None  # the chat template family translated for Ollama, or None
    stop: list[str]
    commands: dict[str, str]
    serving_plan: ServingPlan | None = None

    def to_json(self) -> dict:
        plan = self.serving_plan.to_json() if self.serving_plan else None
        return {
            "folder": str(self.folder),
            "family": self.family,
            "stop": self.stop,
            "commands": self.commands,
            "vllm_plan": plan,
        }


def template_family(rendered: str | None) -> str | None:
    """The chat template's family, from a one-turn chat it rendered."""
    if rendered is None:
        return None
    if "<|im_start|>" in rendered:
        return "chatml"
    if "<|start_header_id|>" in rendered:
        return "llama3"
    if "[INST]" in rendered:
        return "mistral"
    return None


def default_system_prompt(rendered: str | None, family: str | None) -> str | None:
    """The system prompt the template adds when the chat has none (SmolLM2 and Qwen2 have one)."""
    if rendered is None or family != "chatml" or not rendered.startswith("<|im_start|>system\n"):
        return None
    return rendered[len("<|im_start|>system\n") :].split("<|im_end|>", 1)[0] or None


def render_one_turn(tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    """A one-turn chat through the tokenizer's template; None without one, or when it cannot render."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return str(
            apply_chat_template(
                tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
            )
        )
    except Exception:  # noqa: BLE001 - a template that cannot render is simply not translated
        return None


def stop_texts(tokenizer: PreTrainedTokenizerBase | None, stop_ids: list[int]) -> list[str]:
    if tokenizer is None:
        return []
    texts = []
    for token in stop_ids:
        text = tokenizer.convert_ids_to_tokens(token)
        if isinstance(text, str) and text and text not in texts:
            texts.append(text)
    return texts


def modelfile(
    gguf: Path, tokenizer: PreTrainedTokenizerBase | None, stop: list[str], base_gguf: Path | None = None
) -> tuple[str, str | None]:
    """The Ollama Modelfile text and the template family it translated (None: Ollama reads the GGUF's)."""
    rendered = render_one_turn(tokenizer)
    family = template_family(rendered)
    lines = []
    if base_gguf is not None:
        lines += [f"FROM {base_gguf}", f"ADAPTER {gguf}"]
    else:
        lines.append(f"FROM {gguf}")
    template = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}.get(family or "")
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template embedded in the GGUF")
    if (system := default_system_prompt(rendered, family)) is not None:
        lines.append(f'SYSTEM """{system}"""')
    for text in stop:
        lines.append(f"PARAMETER stop {json.dumps(text, ensure_ascii=False)}")
    return "\n".join(lines) + "\n", family


def commands(
    gguf: Path,
    name: str,
    modelfile_path: Path,
    *,
    base_gguf: Path | None = None,
    peft_adapter: Path | None = None,
    adapter_name: str | None = None,
    base_model: str | None = None,
    rank: int | None = None,
    make_base: str | None = None,
    vllm_flags: str = "",
    qlora_nf4: bool = False,
) -> dict[str, str]:
    """The serving commands, each runnable as given. ``base_gguf``: an adapter-only file's base (served with
    ``--lora``); ``make_base``: the command that writes that base first, when it does not exist yet;
    ``vllm_flags``: the serving plan's ``--max-loras`` / ``--max-cpu-loras``; ``qlora_nf4``: the adapter learned on
    the base in bitsandbytes' NF4, which vLLM quantises the base to on load as well (``--quantization
    bitsandbytes``), so it serves the adapter on the weights it learned on."""
    q = shlex.quote
    out: dict[str, str] = {}
    if make_base is not None:
        out[MAKE_BASE_COMMAND] = make_base
    if base_gguf is not None:
        out["llama-server"] = f"llama-server -m {q(str(base_gguf))} --lora {q(str(gguf))} --jinja --port 8080"
        out["llama-cpp-python server"] = (
            f"python -m llama_cpp.server --model {q(str(base_gguf))} --lora_path {q(str(gguf))} --port 8080"
        )
    else:
        out["llama-server"] = f"llama-server -m {q(str(gguf))} --jinja --port 8080"
        out["llama-cpp-python server"] = f"python -m llama_cpp.server --model {q(str(gguf))} --port 8080"
    out["ollama"] = f"ollama create {q(name)} -f {q(str(modelfile_path))} && ollama run {q(name)}"
    if peft_adapter is not None and base_model is not None:
        out["vllm"] = (
            f"vllm serve {q(base_model)} --enable-lora"
            f" --lora-modules {q(adapter_name or peft_adapter.name)}={q(str(peft_adapter))}"
            f" --max-lora-rank {vllm_max_lora_rank(rank)}{vllm_flags}"
            + (" --quantization bitsandbytes" if qlora_nf4 else "")
        )
    return out


def write_bundle(
    gguf: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    stop_ids: list[int],
    card: str,
    *,
    base_gguf: Path | None = None,
    peft_adapter: Path | None = None,
    adapter_name: str | None = None,
    base_model: str | None = None,
    rank: int | None = None,
    make_base: str | None = None,
    serving_plan: ServingPlan | None = None,
    overwrite: bool = True,
    qlora_nf4: bool = False,
) -> ServingBundle:
    """Write ``<gguf>.serve/`` (Modelfile, README.md) beside the export, atomically. ``rank``: the adapter's
    largest saved rank (vLLM's ``--max-lora-rank``); ``make_base``: see :func:`commands`; ``serving_plan``: how
    many adapters vLLM holds beside the model (its flags go on the vLLM line, its reasoning in the README)."""
    gguf = Path(gguf).absolute()
    folder = gguf.with_name(gguf.name + ".serve")
    name = gguf.stem.replace(".", "-").lower()
    stop = stop_texts(tokenizer, stop_ids)
    text, family = modelfile(gguf, tokenizer, stop, base_gguf)
    cmds = commands(
        gguf,
        name,
        folder / "Modelfile",
        adapter_name=adapter_name,
        base_gguf=base_gguf,
        peft_adapter=peft_adapter,
        base_model=base_model,
        rank=rank,
        make_base=make_base,
        vllm_flags=serving_plan.flags() if serving_plan else "",
        qlora_nf4=qlora_nf4,
    )
    readme = [f"# Serving {gguf.name}", "", card.rstrip(), "", "## Commands", ""]
    for label, line in cmds.items():
        readme += [f"{label}:", "", "```sh", line, "```", ""]
    if serving_plan is not None and "vllm" in cmds:
        readme += ["## vLLM: adapters beside the model", "", *serving_plan.lines(), ""]
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "Modelfile").write_text(text, "utf-8")
        (tmp / "README.md").write_text("\n".join(readme), "utf-8")
    return ServingBundle(folder, family, stop, cmds, serving_plan if "vllm" in cmds else None)
