"""Proving an export in the runtime that will serve it: llama.cpp against the adapter model in transformers.

Two checks, one badge:

* **outputs**: the adapter model (PEFT, transformers) greedily continues the verification prompts
  (core/merge/verify.reference_outputs); llama.cpp runs the same token sequences (teacher-forced)
  on the exported file (a merged GGUF, or a base GGUF with the adapter GGUF on top). Compared:
  greedy agreement over the generated tokens and the mean KL(adapter ‖ llama.cpp) over the adapter
  model's top-k next-token distribution (both renormalised over those k), per output type's
  thresholds (core/export/gguf_types.py);
* **template and tokens**: the chat template embedded in the GGUF, rendered as llama.cpp's server
  renders it and tokenised by llama.cpp, gives the same token ids as the Hugging Face tokenizer's
  own template; BOS and EOS agree, and every token that stops generation in Hugging Face
  (the tokenizer's EOS and generation_config's ``eos_token_id``) stops it in llama.cpp.

"pass" when both pass; "warn" when the outputs are within twice the type's KL and 10 points of its
agreement; "fail" otherwise, or when the template or a stop token differs (the file then answers
differently from the adapter in a chat, whatever its weights). "skipped" says why (llama.cpp not
installed, or --no-verify).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lora_studio.core.export.gguf_types import output_type
from lora_studio.core.generation.chat_template import apply_chat_template
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_studio.core.export.runtime import GgufRunner
    from lora_studio.core.merge.verify import Reference

Status = Literal["pass", "warn", "fail", "skipped"]
TOP_K = 20
RUNTIME_STAGE = "verifying: running the GGUF in llama.cpp"
CHAT = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
)


@dataclass(frozen=True)
class TemplateCheck:
    status: Literal["pass", "fail", "none"]  # "none": no chat template on either side
    same_prompt_tokens: bool | None
    bos: tuple[int | None, int | None]  # (Hugging Face, llama.cpp)
    eos: tuple[int | None, int | None]
    stop_tokens_missing: list[int] = field(default_factory=list)  # HF stop ids llama.cpp does not stop on
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GgufVerification:
    status: Status
    type: str
    greedy_agreement: float | None = None
    mean_top_k_kl: float | None = None
    max_abs_logit_diff: float | None = None
    tokens_compared: int = 0
    prompts: int = 0
    thresholds: tuple[float, float] | None = None  # (agreement, KL) for "pass"
    template: TemplateCheck | None = None
    runtime: str = ""  # "llama.cpp (llama-cpp-python 0.3.36)"
    reason: str = ""  # why skipped, or what failed
    sample: dict | None = None  # {"prompt", "adapter", "llama_cpp"}: both greedy continuations of the first prompt

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.status == "skipped":
            return f"skipped: {self.reason}"
        assert self.greedy_agreement is not None and self.mean_top_k_kl is not None
        engine = self.runtime.split(" (")[0] or "llama.cpp"
        text = (
            f"{self.status}: {engine} agrees with the adapter on {self.greedy_agreement:.0%} of "
            f"{self.tokens_compared} greedy tokens, top-{TOP_K} KL {self.mean_top_k_kl:.2g} ({self.type})"
        )
        if self.template is not None and self.template.status != "none":
            text += f"; chat template and stop tokens {self.template.status}"
        if self.reason:
            text += f" — {self.reason}"
        return text


def skipped(type_name: str, reason: str) -> GgufVerification:
    return GgufVerification("skipped", type_name, reason=reason)


class Runner(Protocol):
    """What the check asks of a runtime (llama.cpp's GgufRunner, mlx-lm's recorded outputs): the logits of every
    position of a token sequence, and a greedy continuation."""

    def logits(self, tokens: list[int]) -> Any: ...

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]: ...


def compare_outputs(
    runner: Runner,
    reference: Reference,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    stage: str = RUNTIME_STAGE,
) -> tuple[float, float, float, int]:
    """(greedy agreement, mean top-k KL, max |Δlogit|, generated tokens) of the runtime (llama.cpp, mlx-lm) against
    ``reference``."""
    import torch

    agree = compared = positions = 0
    kl_sum = max_diff = 0.0
    count = len(reference.sequences)
    for done, (seq, plen, ref_logits) in enumerate(
        zip(reference.sequences, reference.prompt_lengths, reference.logits, strict=True)
    ):
        if cancel is not None:
            cancel.raise_if_cancelled()
        report(Progress(done, count, stage, "prompts"))
        logits = torch.from_numpy(runner.logits([int(t) for t in seq]))
        vocab = min(logits.shape[-1], ref_logits.shape[-1])
        logits, ref = logits[:, :vocab], ref_logits[:, :vocab]
        max_diff = max(max_diff, float((logits - ref).abs().max()))
        top = ref.topk(min(TOP_K, vocab), dim=-1).indices
        p = torch.log_softmax(ref.gather(-1, top), -1)
        q = torch.log_softmax(logits.gather(-1, top), -1)
        kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)
        kl_sum += float(kl.sum())
        positions += kl.numel()
        predicted = logits[plen - 1 : -1].argmax(-1)
        agree += int((predicted == seq[plen:]).sum())
        compared += int(seq.numel() - plen)
    report(Progress(count, count, stage, "prompts"))
    return agree / compared if compared else 1.0, kl_sum / max(positions, 1), max_diff, compared


def sample_continuations(
    runner: Runner, reference: Reference, tokenizer: PreTrainedTokenizerBase, key: str = "llama_cpp"
) -> dict:
    """The first prompt continued greedily by the adapter model and, on its own, by the runtime (under ``key``):
    what a user reads."""
    seq, plen = reference.sequences[0], reference.prompt_lengths[0]
    prompt = [int(t) for t in seq[:plen]]
    ours = runner.greedy(prompt, int(seq.numel() - plen))
    return {
        "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
        "adapter": tokenizer.decode([int(t) for t in seq[plen:]], skip_special_tokens=True),
        key: tokenizer.decode(ours, skip_special_tokens=True),
    }


def hf_stop_tokens(tokenizer: PreTrainedTokenizerBase, folder: Path | None) -> list[int]:
    """The ids that end generation in transformers: the tokenizer's EOS and generation_config's eos_token_id."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if folder is not None and (Path(folder) / "generation_config.json").is_file():
        try:
            eos = json.loads((Path(folder) / "generation_config.json").read_text("utf-8")).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        for value in eos if isinstance(eos, list) else [eos]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return ids


def check_template(runner: GgufRunner, tokenizer: PreTrainedTokenizerBase, folder: Path | None) -> TemplateCheck:
    """The GGUF's chat template and special tokens against the Hugging Face tokenizer's."""
    problems: list[str] = []
    meta = runner.metadata
    gguf_template = meta.get("tokenizer.chat_template")
    hf_template = getattr(tokenizer, "chat_template", None)
    bos = (tokenizer.bos_token_id, runner.bos() if "tokenizer.ggml.bos_token_id" in meta else None)
    eos = (tokenizer.eos_token_id, runner.eos())
    if bos[0] is not None and bos[1] is not None and bos[0] != bos[1]:
        problems.append(f"BOS is {bos[0]} in Hugging Face but {bos[1]} in the GGUF")
    if eos[0] is not None and eos[0] != eos[1]:
        problems.append(f"EOS is {eos[0]} in Hugging Face but {eos[1]} in the GGUF")
    missing = [t for t in hf_stop_tokens(tokenizer, folder) if not runner.is_end_of_generation(t)]
    for t in missing:
        problems.append(
            f"token {t} ({tokenizer.convert_ids_to_tokens(t)!r}) stops generation in Hugging Face, not in llama.cpp"
        )
    same: bool | None = None
    if hf_template and not gguf_template:
        problems.append("the GGUF has no chat template; the Hugging Face tokenizer has one")
    elif gguf_template and not hf_template:
        problems.append("the GGUF has a chat template the Hugging Face tokenizer does not have")
    elif hf_template and gguf_template:
        hf_ids, llama_ids = _prompt_ids(runner, tokenizer, str(gguf_template))
        same = hf_ids == llama_ids
        if isinstance(llama_ids, str):
            problems.append(f"llama.cpp cannot render the GGUF's chat template: {llama_ids}")
        elif not same:
            first = next(
                (i for i, (a, b) in enumerate(zip(hf_ids, llama_ids, strict=False)) if a != b),
                min(len(hf_ids), len(llama_ids)),
            )
            problems.append(
                f"the chat prompt tokenises differently from token {first} on "
                f"({len(hf_ids)} tokens in Hugging Face, {len(llama_ids)} in llama.cpp)"
            )
    # "none": neither side has a chat template nor an EOS to compare
    status: Literal["pass", "fail", "none"] = (
        "fail" if problems else "pass" if same is not None or eos[0] is not None else "none"
    )
    return TemplateCheck(status, same, bos, eos, missing, problems)


def _prompt_ids(
    runner: GgufRunner, tokenizer: PreTrainedTokenizerBase, gguf_template: str
) -> tuple[list[int], list[int] | str]:
    """The chat prompt's ids: Hugging Face's template and tokenizer; the GGUF's template rendered and tokenised
    by llama.cpp as its server does (BOS added when the GGUF says so). A template llama.cpp cannot render: why."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = list(CHAT)
    try:
        text = apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template without a system role: the user turn alone
        messages = messages[1:]
        text = apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=False)
    hf_ids = list(tokenizer(str(text), add_special_tokens=False).input_ids)
    bos_text = runner.token_text(runner.bos()) if runner.bos() >= 0 else ""
    eos_text = runner.token_text(runner.eos()) if runner.eos() >= 0 else ""
    try:
        rendered = Jinja2ChatFormatter(gguf_template, eos_text, bos_text)(messages=messages).prompt  # type: ignore[arg-type, unused-ignore]
    except Exception as exc:  # noqa: BLE001 - a template llama.cpp's renderer rejects is the finding itself
        return hf_ids, f"{type(exc).__name__}: {exc}"
    add_bos = runner.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    llama_ids = runner.tokenize(rendered, add_bos=add_bos)
    return hf_ids, llama_ids


def verdict(
    type_name: str,
    outputs: tuple[float, float, float, int],
    template: TemplateCheck | None,
    prompts: int,
    runtime: str,
    sample: dict | None = None,
) -> GgufVerification:
    spec = output_type(type_name)
    agreement, kl, max_diff, compared = outputs
    if agreement >= spec.agreement and kl <= spec.kl:
        status: Status = "pass"
        reason = ""
    elif agreement >= spec.agreement - 0.10 and kl <= 2 * spec.kl:
        status, reason = "warn", f"outside {type_name}'s thresholds (≥{spec.agreement:.0%}, KL ≤{spec.kl:g})"
    else:
        status, reason = "fail", f"far outside {type_name}'s thresholds (≥{spec.agreement:.0%}, KL ≤{spec.kl:g})"
    if template is not None and template.status == "fail":
        status, reason = "fail", "; ".join(template.problems)
    return GgufVerification(
        status,
        type_name,
        agreement,
        kl,
        max_diff,
        compared,
        prompts,
        (spec.agreement, spec.kl),
        template,
        runtime,
        reason,
        sample,
    )
