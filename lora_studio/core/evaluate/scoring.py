"""Teacher-forced scoring: each variant's log-probabilities of the reference answers, and what follows from them.

Rows are left-padded to one length with explicit position ids (so padding changes nothing a row computes), and
only the last ``max answer + 1`` positions' logits are kept (``logits_to_keep``): a [rows, length, vocab]
tensor would be gigabytes. Row ``i``'s answer of ``c`` tokens is predicted by the ``c`` positions before its last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Logit floats held at once by one forward pass (rows x kept positions x vocabulary): 384 MiB in float32.
LOGIT_BUDGET = 96 * 1024 * 1024
ROW_TOKEN_BUDGET = 8192  # tokens of one forward pass (rows x padded length): bounds the activations


@dataclass(frozen=True)
class ExampleScore:
    """One variant on one example: sums over the answer's tokens."""

    nll: float  # sum of -log p(answer token)
    tokens: int
    correct: int  # positions where the variant's greedy choice is the answer's token
    kl: float | None  # sum of KL(p_reference || p_variant) in nats; None when there is no reference to compare

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else 0.0

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else (self.kl / self.tokens if self.tokens else 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "kl": self.mean_kl, "accuracy": self.accuracy, "tokens": self.tokens}


Row = tuple[Sequence[int], Sequence[int]]  # (prompt ids, answer ids)


def chunks(rows: Sequence[Row], copies: int, vocab: int) -> list[list[int]]:
    """Indices of ``rows`` in groups that one forward pass of ``copies`` variants can take within the budgets."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = kept = 0
    for i, (prompt, answer) in enumerate(rows):
        length, keep = max(longest, len(prompt) + len(answer)), max(kept, len(answer) + 1)
        n = (len(current) + 1) * copies
        if current and (n * keep * vocab > LOGIT_BUDGET or n * length > ROW_TOKEN_BUDGET):
            groups.append(current)
            current, length, keep = [], len(prompt) + len(answer), len(answer) + 1
        current.append(i)
        longest, kept = length, keep
    if current:
        groups.append(current)
    return groups


def answer_logprobs(
    model: Any, rows: Sequence[Row], pad_id: int, model_kwargs: dict[str, Any] | None = None, *, copies: int = 1
) -> list[torch.Tensor]:
    """Log-softmax (float32, [answer length, vocab]) of the positions predicting each row's answer.

    ``copies``: the model returns that many copies of the batch (copy-major; see ``_compat.shared_prefix``).
    """
    import torch

    device = next(model.parameters()).device
    length = max(len(p) + len(a) for p, a in rows)
    keep = max(len(a) for _, a in rows) + 1
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        seq = list(prompt) + list(answer)
        ids[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, length - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
            use_cache=False,
            **(model_kwargs or {}),
        ).logits
    logits = logits[:, -keep:]  # a model that ignores logits_to_keep returns every position
    if logits.shape[0] != copies * len(rows):
        raise RuntimeError(f"the model returned {logits.shape[0]} rows for {copies} x {len(rows)}")
    out = []
    for i in range(copies * len(rows)):
        answer = rows[i % len(rows)][1]
        row = logits[i, keep - len(answer) - 1 : keep - 1].float().cpu()
        out.append(torch.log_softmax(row, dim=-1))
    return out


def logprobs_from_logits(logits: Any, prompt_len: int, answer_len: int) -> torch.Tensor:
    """The answer's log-softmax rows from full-sequence logits ([prompt + answer, vocab], e.g. llama.cpp's)."""
    import torch

    rows = torch.as_tensor(logits[prompt_len - 1 : prompt_len + answer_len - 1], dtype=torch.float32)
    return torch.log_softmax(rows, dim=-1)


class Reference:
    """A reference's log-probs of one answer, with what every KL against it reuses."""

    def __init__(self, logprobs: torch.Tensor) -> None:
        self.logprobs = logprobs
        self.probs = logprobs.exp()
        self.neg_entropy = (self.probs * logprobs.clamp_min(LOGPROB_FLOOR)).sum(-1)


# log-probabilities are clamped here before products with probabilities: 0 · -inf would be NaN, and a
# probability below e**-10000 is 0 in float32 anyway
LOGPROB_FLOOR = -1.0e4


def score(logprobs: torch.Tensor, answer: Sequence[int], reference: Reference | None) -> ExampleScore:
    """Sums over the answer's tokens; KL against ``reference`` (the same positions) when given.

    KL(p || q) = Σ p·log p − Σ p·log q, float32, one product per variant (the first sum is the reference's own).
    Vocabularies of different sizes (a GGUF's padded rows) are compared on the rows they share.
    """
    import torch

    target = torch.as_tensor(list(answer), dtype=torch.long)
    nll = -float(logprobs.gather(-1, target[:, None]).sum())
    correct = int((logprobs.argmax(-1) == target).sum())
    kl = None
    if reference is not None:
        n = min(reference.probs.shape[-1], logprobs.shape[-1])
        if n == reference.probs.shape[-1] == logprobs.shape[-1]:
            cross = (reference.probs * logprobs.clamp_min(LOGPROB_FLOOR)).sum(-1)
            kl = float((reference.neg_entropy - cross).clamp_min(0.0).sum())
        else:
            ref, var = reference.logprobs[:, :n], logprobs[:, :n]
            p = ref.exp()
            terms = p * (ref.clamp_min(LOGPROB_FLOOR) - var.clamp_min(LOGPROB_FLOOR))
            kl = float(terms.sum(-1).clamp_min(0.0).sum())
    return ExampleScore(nll, len(target), correct, kl)
