"""Single-variant generation: same tokens as transformers' own greedy run, streamed in order, cancellable."""

import pytest
import torch

from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.generation.generate import GenerationSettings, TextStream, generate, prompt_ids
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session
from lora_studio.core.tasks import CancelToken


@pytest.fixture(scope="module")
def session(tiny_llama, llama_adapters):
    s = Session()
    s.load(resolve_source(tiny_llama))
    s.attach(llama_adapters["alpha"], "alpha")
    yield s
    s.close()


def test_greedy_matches_transformers_and_streams_in_order(session):
    streamed = []
    out = generate(
        session.model, session.tokenizer, "hello world", GenerationSettings(max_new_tokens=12), on_token=streamed.append
    )
    ids = prompt_ids(session.tokenizer, "hello world")
    ref = session.model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    expected = ref[0, len(ids) :].tolist()
    assert streamed == out.token_ids
    # our run stops at EOS; transformers' reference here does not
    assert out.token_ids == expected[: len(out.token_ids)]
    assert out.prompt_token_count == len(ids)


def test_chat_template_is_applied_unless_raw(session):
    chat = prompt_ids(session.tokenizer, "hi", use_chat_template=True)
    raw = prompt_ids(session.tokenizer, "hi", use_chat_template=False)
    assert len(chat) > len(raw)
    assert session.tokenizer.decode(chat).startswith("<|im_start|>user")


def test_sampling_is_reproducible_with_a_seed(session):
    s = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=1.0, seed=7)
    a = generate(session.model, session.tokenizer, "fox", s)
    b = generate(session.model, session.tokenizer, "fox", s)
    assert a.token_ids == b.token_ids


def test_cancel_stops_within_one_step(session):
    token = CancelToken()
    seen = []

    def on_token(t):
        seen.append(t)
        if len(seen) == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        generate(
            session.model,
            session.tokenizer,
            "fox",
            GenerationSettings(max_new_tokens=50),
            cancel=token,
            on_token=on_token,
        )
    assert 3 <= len(seen) <= 4


def test_text_streams_in_deltas_that_add_up(session):
    """Try it streams text as it is generated: the deltas (and the tokens they cover) add up to the result."""
    deltas: list[tuple[str, int]] = []
    out = generate(
        session.model,
        session.tokenizer,
        "hello world",
        GenerationSettings(max_new_tokens=20),
        on_text=lambda text, tokens: deltas.append((text, tokens)),
    )
    assert len(deltas) > 1
    assert "".join(t for t, _ in deltas) == out.text
    assert sum(n for _, n in deltas) == len(out.token_ids)


def test_text_stream_holds_back_an_incomplete_character(session):
    tok = session.tokenizer
    ids = tok("héllo ✓ wörld", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "prompt,settings,needle",
    [
        ("", GenerationSettings(), "prompt is empty"),
        ("   ", GenerationSettings(), "prompt is empty"),
        ("hi", GenerationSettings(max_new_tokens=0), "max new tokens is 0"),
        ("hi", GenerationSettings(max_new_tokens=1_000_000), "max new tokens is 1,000,000"),
        ("hi", GenerationSettings(max_new_tokens=200), "exceeds the model's context of 128"),
        ("hi", GenerationSettings(do_sample=True, temperature=0), "temperature above 0"),
        ("hi", GenerationSettings(do_sample=True, temperature=float("inf")), "at most 100"),
    ],
)
def test_bad_settings(session, prompt, settings, needle):
    with pytest.raises(UserError, match=needle):
        generate(session.model, session.tokenizer, prompt, settings)
