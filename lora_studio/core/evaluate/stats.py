"""Means over a dataset, and whether a difference between two variants is more than noise.

The loss of a variant on a set is token-weighted (total NLL / total answer tokens), as training reports it. The
difference of two variants is paired: both read the same examples, so the bootstrap resamples *examples* (with
their token counts) and recomputes both means on each resample. The percentile interval of those differences is
the confidence interval shown beside every Δloss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
# An example is a regression of a variant when its loss there exceeds the base's by this much (nats per token:
# e**0.25 ~ 28 % more perplexity on that answer) -- a clear change, not the jitter of a small fine-tune.
REGRESSION_NATS = 0.25


def weighted_mean(sums: Sequence[float], counts: Sequence[int]) -> float:
    total = sum(counts)
    return sum(sums) / total if total else 0.0


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def excludes_zero(self) -> bool:
        return not self.covers(0.0)


def paired_difference_interval(
    sums_a: Sequence[float],
    sums_b: Sequence[float],
    counts: Sequence[int],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval | None:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` (token-weighted), resampling examples in pairs.

    None for fewer than two examples (nothing to resample).
    """
    import torch

    n = len(counts)
    if n < 2 or len(sums_a) != n or len(sums_b) != n:
        return None
    a = torch.tensor(list(sums_a), dtype=torch.float64)
    b = torch.tensor(list(sums_b), dtype=torch.float64)
    c = torch.tensor(list(counts), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n, (samples, n), generator=generator)
    tokens = c[picks].sum(-1).clamp_min(1.0)
    diffs = (a[picks].sum(-1) - b[picks].sum(-1)) / tokens
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(diffs, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return Interval(float(low), float(high))


def is_regression(variant_loss: float, base_loss: float) -> bool:
    return variant_loss - base_loss > REGRESSION_NATS
