"""Proving a merge: the saved folder, loaded as a plain model, against the adapter model.

The reference (base + adapter through PEFT) greedily continues a few prompts; the
merged model is then run on the same token sequences (teacher-forced) and compared:
max |Δlogit|, mean KL(reference ‖ merged) per position, and how often the merged
model's greedy choice agrees with the reference's over the generated tokens.
Thresholds depend on the dtype, because half-precision merging rounds once more
than applying the adapter on the side does:

=========  ============  ========  =========
dtype      max |Δlogit|  mean KL   agreement
=========  ============  ========  =========
float32    1e-3          1e-6      100 %
float16    0.25          2e-3      95 %
bfloat16   1.0           1e-2      90 %
=========  ============  ========  =========

Within all three: "pass"; otherwise "warn" (the folder is still saved: the user decides).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lora_studio.core.generation.generate import CausalLM

PROMPTS = (
    "The quick brown fox",
    "Write a short list of three fruits:",
    "What is the capital of France?",
)
NEW_TOKENS = 16
# The stages a verification reports (merge_and_save adds "verifying: loading the saved folder" between them).
REFERENCE_STAGE = "verifying: running the adapter model"
MERGED_STAGE = "verifying: running the saved folder"
LOADING_STAGE = "verifying: loading the saved folder"
THRESHOLDS = {  # dtype -> (max |Δlogit|, mean KL, greedy agreement)
    "float32": (1e-3, 1e-6, 1.0),
    "float16": (0.25, 2e-3, 0.95),
    "bfloat16": (1.0, 1e-2, 0.90),
}


# "warn": the saved folder differs more than its dtype explains; "fail": it computes NaN or Inf logits
VerificationStatus = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Verification:
    status: VerificationStatus
    max_abs_logit_diff: float
    mean_kl: float
    greedy_agreement: float  # fraction of generated positions where both models pick the same token
    tokens_compared: int
    prompts: int
    dtype: str
    thresholds: tuple[float, float, float]

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.status}: max |Δlogit| {self.max_abs_logit_diff:.3g}, mean KL {self.mean_kl:.3g}, "
            f"greedy agreement {self.greedy_agreement:.0%} over {self.tokens_compared} tokens ({self.dtype})"
        )


@dataclass
class Reference:
    """What the adapter model produced: the token sequences and their logits (float32, on CPU)."""

    sequences: list[torch.Tensor]  # 1-D LongTensors: prompt + generated
    prompt_lengths: list[int]
    logits: list[torch.Tensor]  # [seq_len, vocab] float32

    def __reduce__(self) -> tuple:
        # Sent to a worker process as safetensors bytes: tensors pickled for another process go through
        # torch.multiprocessing's shared memory, and its cache keeps a weak reference for each tensor sent.
        from safetensors.torch import save

        tensors = {f"sequence.{i}": t.contiguous() for i, t in enumerate(self.sequences)}
        tensors |= {f"logits.{i}": t.contiguous() for i, t in enumerate(self.logits)}
        return (_reference_from_bytes, (save(tensors), list(self.prompt_lengths)))


def _reference_from_bytes(blob: bytes, prompt_lengths: list[int]) -> Reference:
    from safetensors.torch import load

    tensors = load(blob)
    count = len(prompt_lengths)
    return Reference(
        [tensors[f"sequence.{i}"] for i in range(count)], prompt_lengths, [tensors[f"logits.{i}"] for i in range(count)]
    )


def _model_device(model: CausalLM) -> torch.device:
    return next(model.parameters()).device


def reference_outputs(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = PROMPTS,
    new_tokens: int = NEW_TOKENS,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> Reference:
    """Greedy continuations of ``prompts`` by ``model`` (the adapter model) and their logits.

    Reports "verifying: running the adapter model" once per prompt: a prompt takes seconds on a big model."""
    import torch

    device = _model_device(model)
    ref = Reference([], [], [])
    weight = model.get_input_embeddings().weight  # .weight: a LoRA-wrapped embedding has no num_embeddings
    assert isinstance(weight, torch.Tensor)  # a parameter (nn.Module's attribute type also allows a module)
    vocab = weight.shape[0]
    with torch.inference_mode():
        for done, prompt in enumerate(prompts):
            if cancel is not None:
                cancel.raise_if_cancelled()
            report(Progress(done, len(prompts), REFERENCE_STAGE, "prompts"))
            ids = tokenizer(prompt, return_tensors="pt").input_ids[0].tolist() or [0]
            if vocab:
                ids = [min(i, vocab - 1) for i in ids]
            seq = torch.tensor([ids], device=device)
            for _ in range(new_tokens):  # plain greedy: no EOS stop, no generation-config surprises
                logits = model(input_ids=seq).logits[0, -1]
                seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
            full = model(input_ids=seq).logits[0].float().cpu()
            ref.sequences.append(seq[0].cpu())
            ref.prompt_lengths.append(len(ids))
            ref.logits.append(full)
    report(Progress(len(prompts), len(prompts), REFERENCE_STAGE, "prompts"))
    return ref


def compare(
    merged_model: PreTrainedModel,
    reference: Reference,
    dtype: str,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> Verification:
    """The merged model on the reference's sequences; reports "verifying: running the saved folder" once per prompt."""
    import torch

    device = _model_device(merged_model)
    max_diff, kl_sum, positions, agree, compared = 0.0, 0.0, 0, 0, 0
    non_finite = False
    with torch.inference_mode():
        count = len(reference.sequences)
        for done, (seq, plen, ref_logits) in enumerate(
            zip(reference.sequences, reference.prompt_lengths, reference.logits, strict=True)
        ):
            if cancel is not None:
                cancel.raise_if_cancelled()
            report(Progress(done, count, MERGED_STAGE, "prompts"))
            logits = merged_model(input_ids=seq.view(1, -1).to(device)).logits[0].float().cpu()
            if not (bool(torch.isfinite(logits).all()) and bool(torch.isfinite(ref_logits).all())):
                non_finite = True  # max() skips NaN: a broken model must not read as a perfect one
            max_diff = max(max_diff, float((logits - ref_logits).abs().max()))
            ref_logp = torch.log_softmax(ref_logits, -1)
            logp = torch.log_softmax(logits, -1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)
            kl_sum += float(kl.sum())
            positions += kl.numel()
            # logits at position i predict token i+1: the generated tokens are seq[plen:]
            predicted = logits[plen - 1 : -1].argmax(-1)
            agree += int((predicted == seq[plen:]).sum())
            compared += int(seq.numel() - plen)
    report(Progress(count, count, MERGED_STAGE, "prompts"))
    limits = THRESHOLDS.get(dtype, THRESHOLDS["bfloat16"])
    mean_kl = kl_sum / max(positions, 1)
    agreement = agree / compared if compared else 1.0
    ok = max_diff <= limits[0] and mean_kl <= limits[1] and agreement >= limits[2]
    status: VerificationStatus = "pass" if ok else "warn"
    if non_finite:
        status, max_diff, mean_kl = "fail", float("inf"), float("inf")
    return Verification(status, max_diff, mean_kl, agreement, compared, len(reference.sequences), dtype, limits)


def load_merged(
    folder: Path,
    dtype: str,
    device_map: str = "cpu",
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> PreTrainedModel:
    """The saved folder as a user would load it: plain AutoModelForCausalLM, nothing from LoRA Studio or PEFT.

    With ``report``, each tensor is reported as "verifying: loading the saved folder"."""
    from dataclasses import replace

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lora_studio.core._compat.tqdm_progress import reporting_progress
    from lora_studio.core.io.page_cache import warm_page_cache

    report(Progress(0, None, LOADING_STAGE))
    warm_page_cache(folder)  # a streamed merge wrote past the cache

    def loading(progress: Progress) -> None:
        report(replace(progress, message=LOADING_STAGE, stage=""))

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the job reports its own progress; no tqdm bar on the user's terminal
    try:
        with reporting_progress(cancel or CancelToken(), loading):
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=getattr(torch, dtype), device_map=device_map
            )
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    model.eval()
    return model
