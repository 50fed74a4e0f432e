"""How far apart the columns of a comparison are, token by token.

Two measures against a chosen reference column:

* **first divergence**: the index of the first new token where a column differs
  from the reference (None when they are identical);
* **teacher-forced scores**: every variant reads the *reference* continuation
  (prompt + reference tokens, one forward pass) and we record, per reference
  token t, the variant's log-probability of that token, KL(p_ref,t || p_var,t)
  in nats, and whether the variant's own greedy choice equals the reference token.
  Summaries: mean KL and greedy agreement % (share of positions where it does).

The maths here works on logits handed in; running the models is the
comparison module's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first position where ``tokens`` and ``reference`` differ; None if equal.

    A column that is a strict prefix of the other (it stopped early at EOS) diverges
    at its own end: the position where one has a token and the other has none.
    """
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    if len(tokens) != len(reference):
        return min(len(tokens), len(reference))
    return None


def first_divergences(columns: Mapping[str, Sequence[int]], reference: str) -> dict[str, int | None]:
    if reference not in columns:
        raise KeyError(reference)
    ref = columns[reference]
    return {name: first_divergence(ids, ref) for name, ids in columns.items()}


@dataclass(frozen=True)
class TokenScores:
    """One variant scored on the reference continuation (lists are per reference token)."""

    logprobs: list[float]  # log p_variant(reference token | reference prefix)
    kl: list[float]  # KL(p_reference || p_variant) in nats at each position
    agrees: list[bool]  # the variant's argmax equals the reference token

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else 0.0

    @property
    def agreement(self) -> float:
        """Greedy agreement in percent (100 for an empty continuation)."""
        return 100.0 * sum(self.agrees) / len(self.agrees) if self.agrees else 100.0

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


def token_scores(
    reference_logits: torch.Tensor, variant_logits: torch.Tensor, target_ids: Sequence[int]
) -> TokenScores:
    """Scores from logits at the positions that predict each reference token.

    ``reference_logits`` and ``variant_logits``: [T, V] tensors, row t being the
    distribution over token t of the continuation; ``target_ids``: the T reference
    tokens. Computed in float64 so that KL of a column against itself is exactly 0.
    """
    import torch

    ref = torch.log_softmax(reference_logits.detach().to(torch.float64), dim=-1)
    var = torch.log_softmax(variant_logits.detach().to(torch.float64), dim=-1)
    target = torch.as_tensor(list(target_ids), dtype=torch.long, device=var.device)
    if ref.shape != var.shape or ref.shape[0] != target.shape[0]:
        raise ValueError(
            f"shapes differ: reference {tuple(ref.shape)}, variant {tuple(var.shape)}, targets {tuple(target.shape)}"
        )
    logprobs = var.gather(-1, target[:, None])[:, 0]
    # KL(p||q) = sum p (log p - log q); xlogy-style guard: where p is 0 the term is 0 even if q is 0.
    p = ref.exp()
    terms = torch.where(p > 0, p * (ref - var), torch.zeros_like(p))
    kl = terms.sum(-1).clamp_min(0.0)
    agrees = var.argmax(-1) == target
    return TokenScores([float(x) for x in logprobs], [float(x) for x in kl], [bool(x) for x in agrees])


@dataclass(frozen=True)
class ColumnDivergence:
    name: str
    first_divergence: int | None  # vs the reference's generated tokens
    scores: TokenScores | None = None  # teacher-forced on the reference continuation

    def to_json(self) -> dict:
        out: dict[str, object] = {"name": self.name, "first_divergence": self.first_divergence}
        if self.scores is not None:
            out.update(
                mean_kl=self.scores.mean_kl,
                agreement=self.scores.agreement,
                mean_logprob=self.scores.mean_logprob,
                logprobs=self.scores.logprobs,
                kl=self.scores.kl,
            )
        return out


@dataclass(frozen=True)
class DivergenceReport:
    reference: str
    columns: list[ColumnDivergence] = field(default_factory=list)

    def column(self, name: str) -> ColumnDivergence:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict:
        return {"reference": self.reference, "columns": [c.to_json() for c in self.columns]}


def summary(report: DivergenceReport) -> dict:
    """{name: {first_divergence, mean_kl, agreement}} for compact display."""
    out = {}
    for c in report.columns:
        out[c.name] = {
            "first_divergence": c.first_divergence,
            "mean_kl": c.scores.mean_kl if c.scores else None,
            "agreement": c.scores.agreement if c.scores else None,
        }
    return out
