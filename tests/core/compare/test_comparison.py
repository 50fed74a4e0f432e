"""Comparison: one mixed-adapter batch gives each variant's single-run tokens; streaming, cancel, fallbacks, state."""

import factories
import pytest
import torch

from lora_studio.core import compare as comparison
from lora_studio.core.compare import Variant, compare, load_beside, session_variants
from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.generation.generate import GenerationSettings, generate
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session
from lora_studio.core.tasks import CancelToken

PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog. LoRA adapters add", "Paris"]
GREEDY = GenerationSettings(max_new_tokens=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def session(one_thread, tiny_llama, llama_adapters):
    s = factories.alpha_beta_session(tiny_llama, llama_adapters)
    yield s
    s.close()


def single_run(session, variant: str, prompt: str, settings=GREEDY) -> list[int]:
    """The reference: the variant alone through generation.generate with the session switched to it."""
    if variant == "base":
        session.disable_adapters()
    else:
        session.activate(variant)
    try:
        return generate(session.model, session.tokenizer, prompt, settings).token_ids
    finally:
        session.activate("alpha")


def test_mixed_batch_equals_single_runs_for_prompts_of_different_lengths(session):
    lengths = {len(session.tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == 3  # left padding is really exercised
    result = compare(session, session_variants(session), PROMPTS, GREEDY)
    assert result.mixed_batch and result.fallback_reason is None
    assert result.variants == ["base", "alpha", "beta"]
    for prompt, cmp in zip(PROMPTS, result.prompts, strict=True):
        columns = {o.name: o.token_ids for o in cmp.outputs}
        for name in ("base", "alpha", "beta"):
            assert columns[name] == single_run(session, name, prompt), (prompt, name)
        assert len({tuple(ids) for ids in columns.values()}) == 3  # the adapters really change the output
        assert cmp.output("beta").text == session.tokenizer.decode(columns["beta"], skip_special_tokens=True)
    # the session is as it was: alpha active, adapters enabled
    assert session.active_adapter == "alpha" and session.adapters_enabled
    assert session.model.active_adapter == "alpha"


def test_sequential_equals_mixed_and_restores_disabled_state(session):
    session.disable_adapters()
    try:
        mixed = compare(session, session_variants(session), PROMPTS[:2], GREEDY, score=False)
        assert session.active_adapter is None and not session.adapters_enabled
        seq = compare(session, session_variants(session), PROMPTS[:2], GREEDY, mixed=False, score=False)
        assert not session.adapters_enabled
        assert not seq.mixed_batch and "sequential" in seq.fallback_reason
        for a, b in zip(mixed.prompts, seq.prompts, strict=True):
            assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        # still base behaviour after both
        x = torch.tensor([[1, 2, 3]])
        with torch.inference_mode(), session.model.disable_adapter():
            expected = session.model(input_ids=x).logits
        with torch.inference_mode():
            assert torch.equal(session.model(input_ids=x).logits, expected)
    finally:
        session.activate("alpha")


def test_streaming_delivers_every_token_in_order(session):
    deltas = []
    result = compare(session, session_variants(session), PROMPTS[:2], GREEDY, on_tokens=deltas.append, score=False)
    for i, cmp in enumerate(result.prompts):
        for out in cmp.outputs:
            streamed = [t for d in deltas if (d.prompt_index, d.variant) == (i, out.name) for t in d.token_ids]
            assert streamed == out.token_ids
            text = "".join(d.text for d in deltas if (d.prompt_index, d.variant) == (i, out.name))
            assert text == out.text


def test_cancel_stops_within_one_step(session):
    token = CancelToken()
    deltas = []

    def on_tokens(d):
        deltas.append(d)
        if len(deltas) == 3 * 3:  # three steps of three columns
            token.cancel()

    with pytest.raises(Cancelled):
        compare(
            session,
            session_variants(session),
            "fox",
            GenerationSettings(max_new_tokens=60),
            cancel=token,
            on_tokens=on_tokens,
        )
    assert len(deltas) <= 4 * 3
    assert session.active_adapter == "alpha" and session.adapters_enabled


def test_progress_counts_tokens(session):
    seen = []
    compare(
        session, session_variants(session), "fox", GenerationSettings(max_new_tokens=5), report=seen.append, score=False
    )
    tokens = [p for p in seen if p.unit == "tokens"]
    assert tokens and tokens[-1].total == 15 and tokens[-1].done <= 15


def test_sampling_runs_each_column_seeded_and_reproducible(session):
    s = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=1.0, seed=7)
    a = compare(session, session_variants(session), "fox", s, score=False)
    b = compare(session, session_variants(session), "fox", s, score=False)
    assert not a.mixed_batch and "sampling" in a.fallback_reason
    assert [o.token_ids for o in a.prompts[0].outputs] == [o.token_ids for o in b.prompts[0].outputs]
    # each column is what the quick test box gives with the same seed
    assert a.prompts[0].output("beta").token_ids == single_run(session, "beta", "fox", s)


def test_dora_falls_back_to_sequential_and_says_why(tiny_llama, llama_adapters, tmp_path):
    dora = factories.make_adapter(tiny_llama, tmp_path / "dora", seed=21, use_dora=True)
    s = Session()
    s.load(resolve_source(tiny_llama))
    try:
        s.attach(llama_adapters["alpha"], "alpha")
        s.attach(dora, "dora")
        result = compare(s, session_variants(s), PROMPTS[:2], GREEDY, score=False)
        assert not result.mixed_batch
        assert "dora is a DoRA adapter" in result.fallback_reason
        assert result.prompts[1].output("dora").token_ids == single_run_on(s, "dora", PROMPTS[1])
    finally:
        s.close()


def single_run_on(session, name, prompt):
    session.activate(name)
    return generate(session.model, session.tokenizer, prompt, GREEDY).token_ids


def test_merged_layers_fall_back(session):
    session.model.merge_adapter(["beta"])
    try:
        assert "merged" in comparison.mixed_batch_refusal(session, session_variants(session), GREEDY)
    finally:
        session.model.unmerge_adapter()
    assert comparison.mixed_batch_refusal(session, session_variants(session), GREEDY) is None


def test_combination_and_merged_model_variants(session, tiny_llama, llama_adapters, tmp_path):
    attached = session.register_combination("mix", {"alpha": 0.5, "beta": 0.5}, "cat")
    try:
        assert "alpha×0.5 + beta×0.5" in str(attached.path)
        assert session.active_adapter == "alpha"  # creating it does not switch
        # a merged folder of alpha, loaded beside the session
        merged_dir = tmp_path / "merged"
        ref = factories.peft_model(tiny_llama, {"alpha": llama_adapters["alpha"]}).merge_and_unload()
        ref.save_pretrained(merged_dir)
        session.tokenizer.save_pretrained(merged_dir)
        beside = load_beside(merged_dir, session)
        variants = [Variant.of_adapter("alpha"), Variant.of_adapter("mix"), Variant.merged(beside, "merged")]
        result = compare(session, variants, PROMPTS[0], GREEDY)
        assert result.mixed_batch
        cmp = result.prompts[0]
        assert cmp.output("mix").token_ids == single_run(session, "mix", PROMPTS[0])
        assert cmp.output("mix").token_ids != cmp.output("alpha").token_ids
        # merging alpha into the base gives alpha's tokens (float32 rounding aside, on this prompt)
        assert cmp.output("merged").token_ids == cmp.output("alpha").token_ids
        div = cmp.divergence
        assert div.reference == "alpha" and div.column("merged").first_divergence is None
        assert div.column("merged").scores.mean_kl < 1e-6 and div.column("merged").scores.agreement == 100.0
    finally:
        session.delete("mix")
    assert "mix" not in session.model.peft_config and session.active_adapter == "alpha"


def test_divergence_scores_match_a_hand_computation(session):
    result = compare(session, session_variants(session), PROMPTS[0], GREEDY, reference="base")
    cmp = result.prompts[0]
    ref_ids = cmp.output("base").token_ids
    base_col, beta_col = cmp.divergence.column("base"), cmp.divergence.column("beta")
    assert base_col.first_divergence is None and base_col.scores.mean_kl == 0 and base_col.scores.agreement == 100.0
    from lora_studio.core.generation.generate import prompt_ids

    seq = torch.tensor([prompt_ids(session.tokenizer, PROMPTS[0]) + ref_ids])
    start = seq.shape[1] - len(ref_ids) - 1
    session.activate("beta")
    with torch.inference_mode():
        q = session.model(input_ids=seq).logits[0, start : start + len(ref_ids)].double().log_softmax(-1)
        with session.model.disable_adapter():
            p = session.model(input_ids=seq).logits[0, start : start + len(ref_ids)].double().log_softmax(-1)
    session.activate("alpha")
    kl = (p.exp() * (p - q)).sum(-1)
    assert beta_col.scores.kl == pytest.approx(kl.tolist(), abs=1e-5)
    lp = q[torch.arange(len(ref_ids)), torch.tensor(ref_ids)]
    assert beta_col.scores.logprobs == pytest.approx(lp.tolist(), abs=1e-5)
    agree = (q.argmax(-1) == torch.tensor(ref_ids)).double().mean().item() * 100
    assert beta_col.scores.agreement == pytest.approx(agree)
    beta_ids = cmp.output("beta").token_ids
    expected_first = next((i for i, (a, b) in enumerate(zip(beta_ids, ref_ids, strict=False)) if a != b), None)
    assert beta_col.first_divergence == expected_first


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(prompts=""), "prompt is empty"),
        (dict(prompts=[]), "there are no prompts"),
        (dict(settings=GenerationSettings(max_new_tokens=0)), "max new tokens is 0"),
        (dict(settings=GenerationSettings(max_new_tokens=1_000_000)), "max new tokens is 1,000,000"),
        (dict(settings=GenerationSettings(max_new_tokens=200)), "exceeds the model's context of 128"),
        (dict(variants=[]), "no variants"),
        (dict(variants=[Variant.of_adapter("nope")]), "no adapter named 'nope'"),
        (dict(variants=[Variant.base(), Variant.base()]), "two columns are named 'base'"),
        (dict(reference="gamma"), "reference column 'gamma'"),
    ],
)
def test_bad_input(session, kwargs, needle):
    args = dict(variants=session_variants(session), prompts="hi", settings=GREEDY)
    args.update(kwargs)
    reference = args.pop("reference", None)
    with pytest.raises(UserError, match=needle):
        compare(session, args["variants"], args["prompts"], args["settings"], reference=reference)


def test_combination_bad_input(session):
    with pytest.raises(UserError, match="no adapter named 'zeta'"):
        session.register_combination("c", {"zeta": 1.0})
    with pytest.raises(UserError, match="needs a density"):
        session.register_combination("c", {"alpha": 1.0}, "ties")
    with pytest.raises(UserError, match="already attached"):
        session.register_combination("alpha", {"beta": 1.0})
    # linear needs equal ranks: PEFT's refusal becomes one clear line, and nothing is left behind
    with pytest.raises(UserError, match="PEFT cannot combine these adapters with linear"):
        session.register_combination("c", {"alpha": 1.0, "beta": 1.0}, "linear")
    assert "c" not in session.model.peft_config and "c" not in session.adapters


def test_gpt2_conv1d_adapter_mixed_equals_single(tiny_gpt2, gpt2_adapter):
    s = Session()
    s.load(resolve_source(tiny_gpt2))
    try:
        s.attach(gpt2_adapter, "g")
        result = compare(s, session_variants(s), PROMPTS[:2], GREEDY, score=False)
        assert result.mixed_batch
        for prompt, cmp in zip(PROMPTS[:2], result.prompts, strict=True):
            assert cmp.output("g").token_ids == single_run_on(s, "g", prompt)
            s.disable_adapters()
            assert cmp.output("base").token_ids == generate(s.model, s.tokenizer, prompt, GREEDY).token_ids
    finally:
        s.close()


def test_a_half_precision_mixed_batch_says_it_may_round_differently(tiny_llama_bf16, models_dir):
    """float32 mixed batches are token-exact (the tests above); bfloat16 ones are said to be possibly not, in the
    result and its JSON, and mixed=False (one at a time) is exact by construction."""
    from lora_studio.core.compare import Variant, compare
    from lora_studio.core.generation.generate import GenerationSettings
    from lora_studio.core.model.sources import resolve_source
    from lora_studio.core.session import Session

    adapter = factories.make_adapter(tiny_llama_bf16, models_dir / "bf16-adapter", seed=61, dtype="bfloat16")
    session = Session()
    try:
        session.load(resolve_source(tiny_llama_bf16), dtype="bfloat16")
        session.attach(adapter, "a")
        variants = [Variant.base(), Variant.of_adapter("a")]
        mixed = compare(session, variants, "hello", GenerationSettings(max_new_tokens=4))
        alone = compare(session, variants, "hello", GenerationSettings(max_new_tokens=4), mixed=False)
    finally:
        session.close()
    assert mixed.mixed_batch and not mixed.exact and "bfloat16" in (mixed.inexact_reason or "")
    assert mixed.to_json()["mixed_batch_exact"] is False
    assert not alone.mixed_batch and alone.exact and alone.to_json()["mixed_batch_exact"] is True
