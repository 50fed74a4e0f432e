"""Evaluation: losses equal a hand-written PEFT loop; the mixed batch equals sequential runs; intervals; scales."""

import json
import math
import random

import factories
import pytest
import torch

from lora_studio.core.compare import Variant
from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.evaluate import datasets, stats
from lora_studio.core.evaluate.run import evaluate
from lora_studio.core.evaluate.scale import parse_scales, sweep_scale
from lora_studio.core.tasks import CancelToken

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"instruction": "Say hello.", "answer": "Hello there, friend."},
    {"instruction": "Count to three.", "answer": "One, two, three."},
    {"instruction": "Name a colour.", "answer": "Blue."},
    {"instruction": "What is the capital of France? Answer in a sentence.", "answer": "Paris is the capital."},
    {"instruction": "Write a short greeting for a letter.", "answer": "Dear Sam, I hope you are well."},
]


@pytest.fixture(scope="module")
def session(one_thread, tiny_llama, llama_adapters):
    s = factories.alpha_beta_session(tiny_llama, llama_adapters)
    yield s
    s.close()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "greetings.val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def eval_set(session, data_file):
    return datasets.load_eval_set(data_file, session.tokenizer)


VARIANTS = [Variant.base(), Variant.of_adapter("alpha"), Variant.of_adapter("beta")]


def hand_written_loss(tiny_llama, adapters, name, example) -> tuple[float, int, int]:
    """A plain PEFT loop: the variant alone, one example, full logits, torch's cross-entropy."""
    model = factories.peft_model(tiny_llama, adapters, active=None if name == "base" else name)
    ids = torch.tensor([list(example.prompt_ids) + list(example.answer_ids)])
    with torch.inference_mode():
        if name == "base":
            with model.disable_adapter():
                logits = model(input_ids=ids).logits[0]
        else:
            logits = model(input_ids=ids).logits[0]
    start = len(example.prompt_ids)
    pred = logits[start - 1 : -1]
    target = ids[0, start:]
    nll = float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
    return nll, len(target), int((pred.argmax(-1) == target).sum())


def test_losses_equal_a_hand_written_peft_loop(session, eval_set, tiny_llama, llama_adapters):
    result = evaluate(session, VARIANTS, [eval_set])
    assert result.mixed_batch and result.fallback_reason is None
    for name in ("base", "alpha", "beta"):
        total_nll = total_tokens = total_correct = 0.0
        for example, got in zip(eval_set.examples, result.scores[name], strict=True):
            nll, tokens, correct = hand_written_loss(tiny_llama, llama_adapters, name, example)
            assert got.tokens == tokens and got.correct == correct
            assert got.nll == pytest.approx(nll, abs=1e-4)
            total_nll, total_tokens, total_correct = total_nll + nll, total_tokens + tokens, total_correct + correct
        summary = result.overall(name)
        assert summary.loss == pytest.approx(total_nll / total_tokens, abs=1e-5)
        assert summary.perplexity == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
        assert summary.accuracy == pytest.approx(total_correct / total_tokens)
    assert result.overall("base").kl == 0.0 and result.overall("alpha").kl > 0
    assert result.overall("base").delta_loss is None


def test_mixed_batch_equals_each_variant_alone_and_one_example_at_a_time(session, eval_set):
    mixed = evaluate(session, VARIANTS, [eval_set])
    alone = evaluate(session, VARIANTS, [eval_set], mixed=False)
    single = evaluate(session, VARIANTS, [eval_set], mixed=False, batch_examples=1)
    assert not alone.mixed_batch and alone.fallback_reason == "sequential runs were asked for"
    for name in ("base", "alpha", "beta"):
        for a, b, c in zip(mixed.scores[name], alone.scores[name], single.scores[name], strict=True):
            assert a.nll == pytest.approx(b.nll, abs=1e-5) and a.nll == pytest.approx(c.nll, abs=1e-4)
            assert a.kl == pytest.approx(b.kl, abs=1e-5)
    assert session.state().active_adapter == "alpha"  # the selection is given back


def test_kl_is_against_the_chosen_reference(session, eval_set):
    result = evaluate(session, VARIANTS, [eval_set], reference="alpha")
    assert result.reference == "alpha" and result.overall("alpha").kl == 0.0
    assert result.overall("base").delta_loss == pytest.approx(
        result.overall("base").loss - result.overall("alpha").loss
    )


def test_per_set_summaries_and_regressions(session, data_file, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": r["instruction"], "completion": r["answer"]}) + "\n" for r in ROWS))
    sets = datasets.load_eval_sets([data_file, other], session.tokenizer)
    assert [e.index for s in sets for e in s.examples] == list(range(2 * len(ROWS)))
    result = evaluate(session, VARIANTS, sets)
    names = {(s.name, s.dataset) for s in result.summary}
    assert ("alpha", "greetings.val") in names and ("alpha", "other") in names and ("alpha", None) in names
    doc = result.to_json()
    assert doc["kind"] == "evaluation" and len(doc["examples"]) == 2 * len(ROWS)
    json.dumps(doc, allow_nan=False)
    for e in doc["examples"]:
        for name in e["regressed"]:
            assert e["scores"][name]["loss"] - e["scores"]["base"]["loss"] > stats.REGRESSION_NATS


def test_the_interval_covers_the_truth_on_a_synthetic_case():
    """Examples whose per-token losses differ by a known mean: the 95 % interval covers it in ~95 % of trials."""
    rng = random.Random(5)
    truth, covered, trials = 0.3, 0, 200
    for t in range(trials):
        counts = [rng.randint(5, 40) for _ in range(40)]
        a, b = [], []
        for n in counts:
            base = rng.gauss(2.0, 0.5)
            a.append(n * (base + truth + rng.gauss(0, 0.4)))
            b.append(n * base)
        interval = stats.paired_difference_interval(a, b, counts, samples=400, seed=t)
        covered += interval.covers(truth)
    assert 0.88 * trials <= covered <= trials


def test_scale_one_is_the_adapter_and_zero_the_base(session, eval_set):
    plain = evaluate(session, VARIANTS, [eval_set], bootstrap_samples=0)
    sweep = sweep_scale(session, "beta", [eval_set], [0.0, 0.5, 1.0])
    at = {p.scale: p for p in sweep.points}
    assert at[1.0].loss == pytest.approx(plain.overall("beta").loss, abs=1e-6)
    assert at[0.0].loss == pytest.approx(plain.overall("base").loss, abs=1e-6)
    assert at[0.0].kl_from_base == pytest.approx(0.0, abs=1e-9)
    assert sweep.best.scale in at and sweep.base_loss == pytest.approx(plain.overall("base").loss, abs=1e-6)
    assert session.scales == {}  # the sweep gives the session's scale back


def test_a_session_scale_is_what_evaluation_and_state_see(session, eval_set):
    half = sweep_scale(session, "alpha", [eval_set], [0.5]).points[0]
    session.set_scale("alpha", 0.5)
    try:
        result = evaluate(session, VARIANTS, [eval_set], bootstrap_samples=0)
        assert result.overall("alpha").loss == pytest.approx(half.loss, abs=1e-6)
        assert session.state().scale_of("alpha") == 0.5
        assert next(v for v in result.variants if v["name"] == "alpha")["scale"] == 0.5
    finally:
        session.set_scale("alpha", 1.0)
    assert session.state().scales == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0, 0.5, 1", [0.0, 0.5, 1.0]), ("0:1:0.25", [0.0, 0.25, 0.5, 0.75, 1.0]), ("1;0", [0.0, 1.0])],
)
def test_parse_scales(text, expected):
    assert parse_scales(text) == expected


@pytest.mark.parametrize(("text", "needle"), [("a, b", "cannot read"), ("0:1:0", "positive"), ("-1", "outside")])
def test_parse_scales_refuses(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_scales(text)


def test_bad_input(session, eval_set, tmp_path):
    with pytest.raises(UserError, match="no variants"):
        evaluate(session, [], [eval_set])
    with pytest.raises(UserError, match="not among"):
        evaluate(session, VARIANTS, [eval_set], reference="gamma")
    with pytest.raises(UserError, match="no adapter named"):
        evaluate(session, [Variant.of_adapter("gamma")], [eval_set])
    with pytest.raises(UserError, match="outside"):
        session.set_scale("alpha", float("nan"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no rows"):
        datasets.load_eval_set(empty, session.tokenizer)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "x"}\n')
    with pytest.raises(UserError, match="match no dataset shape"):
        datasets.load_eval_set(wrong, session.tokenizer)


def test_cancel(session, eval_set):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        evaluate(session, VARIANTS, [eval_set], cancel=token)


def test_demo_sets_and_defaults():
    sets = datasets.demo_sets()
    assert [p.name for p in sets] == ["bullets.val.jsonl", "pirate.val.jsonl", "sql.val.jsonl"]
    from lora_studio.core.demo.assets import demo_dir

    assert datasets.default_set_for(demo_dir() / "adapters" / "pirate").name == "pirate.val.jsonl"


def test_the_default_set_is_the_very_file_the_training_recorded(tmp_path):
    import json

    from lora_studio.core.adapters.files import SIDECAR_NAME
    from lora_studio.core.io.hashing import tree_sha256

    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "a", "completion": "b"}\n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()

    def recorded(path, digest):
        (adapter / SIDECAR_NAME).write_text(json.dumps({"data": {"val_file": str(path), "val_sha256": digest}}))
        return datasets.default_set_for(adapter)

    assert recorded(val, tree_sha256(val)) == val
    assert recorded(val, "0" * 64) is None  # another file now, or a record naming any file on the machine
    assert recorded(val, None) is None
    decoy = tmp_path / "decoy.jsonl"
    decoy.symlink_to("/dev/zero")
    assert recorded(decoy, "0" * 64) is None  # not opened: not a regular file


def test_layers_below_the_first_adapted_one_run_once_per_example(tiny_llama, models_dir, data_file):
    """Adapters on the top layer only: layer 0 sees each example once, and the losses equal sequential runs."""
    from lora_studio.core._compat.shared_prefix import first_adapted_layer
    from lora_studio.core.compare import mixed_batch_refusal
    from lora_studio.core.generation.generate import GenerationSettings
    from lora_studio.core.model.sources import resolve_source
    from lora_studio.core.session import Session

    top = {
        name: factories.make_adapter(
            tiny_llama, models_dir / f"top-{name}", seed=seed, layers_to_transform=[1], target_modules=("q_proj",)
        )
        for name, seed in (("up", 21), ("down", 22))
    }
    session = Session()
    session.load(resolve_source(tiny_llama))
    try:
        for name, path in top.items():
            session.attach(path, name)
        assert first_adapted_layer(session.model) == (1, "")
        eval_set = datasets.load_eval_set(data_file, session.tokenizer)
        variants = [Variant.base(), Variant.of_adapter("up"), Variant.of_adapter("down")]
        with session.lock:  # the one-time probe of whether PEFT can mix these adapters, before counting
            assert mixed_batch_refusal(session, variants, GenerationSettings()) is None
        rows_seen: list[int] = []
        layer0 = session.model.get_base_model().get_decoder().layers[0]
        handle = layer0.register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[0]))
        try:
            mixed = evaluate(session, variants, [eval_set])
        finally:
            handle.remove()
        assert sum(rows_seen) == len(eval_set.examples)  # once per example, not once per variant
        alone = evaluate(session, variants, [eval_set], mixed=False)
        for name in ("base", "up", "down"):
            for a, b in zip(mixed.scores[name], alone.scores[name], strict=True):
                assert a.nll == pytest.approx(b.nll, abs=1e-5)
        assert mixed.overall("up").kl > 0
    finally:
        session.close()
