"""Divergence maths against hand computations: first differing token, per-token log-prob, KL, agreement."""

import math

import pytest
import torch

from lora_studio.core.compare.divergence import (
    ColumnDivergence,
    DivergenceReport,
    TokenScores,
    first_divergence,
    first_divergences,
    summary,
    token_scores,
)


@pytest.mark.parametrize(
    "tokens,reference,expected",
    [
        ([1, 2, 3], [1, 2, 3], None),
        ([1, 2, 4], [1, 2, 3], 2),
        ([9, 2, 3], [1, 2, 3], 0),
        ([1, 2], [1, 2, 3], 2),  # stopped early (EOS): diverges where it ended
        ([1, 2, 3, 4], [1, 2, 3], 3),
        ([], [], None),
        ([], [5], 0),
    ],
)
def test_first_divergence(tokens, reference, expected):
    assert first_divergence(tokens, reference) == expected


def test_first_divergences_per_column():
    cols = {"base": [1, 2, 3], "a": [1, 5, 3], "b": [1, 2, 3]}
    assert first_divergences(cols, "base") == {"base": None, "a": 1, "b": None}
    with pytest.raises(KeyError):
        first_divergences(cols, "zzz")


def test_token_scores_by_hand():
    # two positions over a 3-token vocabulary
    ref_logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    var_logits = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    target = [0, 0]
    s = token_scores(ref_logits, var_logits, target)
    # position 0: p = (1/3,1/3,1/3), q = (1/2,1/4,1/4)
    p0, q0 = [1 / 3] * 3, [0.5, 0.25, 0.25]
    kl0 = sum(p * math.log(p / q) for p, q in zip(p0, q0, strict=True))
    # position 1: p ∝ (e², 1, 1), q ∝ (1, 1, e³)
    zp, zq = math.exp(2) + 2, math.exp(3) + 2
    p1 = [math.exp(2) / zp, 1 / zp, 1 / zp]
    q1 = [1 / zq, 1 / zq, math.exp(3) / zq]
    kl1 = sum(p * math.log(p / q) for p, q in zip(p1, q1, strict=True))
    assert s.kl == pytest.approx([kl0, kl1], rel=1e-9)
    assert s.logprobs == pytest.approx([math.log(0.5), math.log(1 / zq)], rel=1e-9)
    assert s.agrees == [True, False]
    assert s.agreement == 50.0
    assert s.mean_kl == pytest.approx((kl0 + kl1) / 2)
    assert s.mean_logprob == pytest.approx((math.log(0.5) + math.log(1 / zq)) / 2)


def test_against_itself_is_zero_and_full_agreement():
    logits = torch.randn(5, 11)
    target = logits.argmax(-1).tolist()
    s = token_scores(logits, logits, target)
    assert s.kl == [0.0] * 5 and s.agreement == 100.0


def test_zero_probability_in_reference_contributes_nothing():
    ref = torch.tensor([[0.0, float("-inf")]])
    var = torch.tensor([[0.0, 0.0]])
    s = token_scores(ref, var, [0])
    assert s.kl == pytest.approx([math.log(2)])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        token_scores(torch.zeros(2, 3), torch.zeros(3, 3), [0, 0])


def test_empty_continuation_and_report_json():
    empty = TokenScores([], [], [])
    assert empty.mean_kl == 0.0 and empty.agreement == 100.0
    report = DivergenceReport("base", [ColumnDivergence("base", None, empty), ColumnDivergence("a", 2, None)])
    js = report.to_json()
    assert js["reference"] == "base" and js["columns"][0]["agreement"] == 100.0 and "mean_kl" not in js["columns"][1]
    assert summary(report) == {
        "base": {"first_divergence": None, "mean_kl": 0.0, "agreement": 100.0},
        "a": {"first_divergence": 2, "mean_kl": None, "agreement": None},
    }
    with pytest.raises(KeyError):
        report.column("nope")
