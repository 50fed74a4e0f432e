"""Chat in Compare: each variant answers with its own history, in one mixed batch equal to running it alone."""

import factories
import pytest
import torch

from lora_studio.core.compare import Variant
from lora_studio.core.compare.chat import Conversation, chat_prompt_ids, chat_turn
from lora_studio.core.errors import UserError
from lora_studio.core.generation.generate import GenerationSettings

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = GenerationSettings(max_new_tokens=6)
VARIANTS = [Variant.base(), Variant.of_adapter("alpha"), Variant.of_adapter("beta")]


@pytest.fixture(scope="module")
def session(tiny_llama, llama_adapters):
    session = factories.alpha_beta_session(tiny_llama, llama_adapters)
    yield session
    session.close()


def two_turns(session, mixed: bool) -> Conversation:
    conversation = Conversation(system="Be brief.")
    for user in ("hello there", "and then?"):
        conversation.turns.append(chat_turn(session, VARIANTS, conversation, user, SETTINGS, mixed=mixed))
    return conversation


def test_a_mixed_chat_equals_each_variant_alone(session):
    mixed, alone = two_turns(session, True), two_turns(session, False)
    assert mixed.turns[0].mixed_batch and not alone.turns[0].mixed_batch
    for a, b in zip(mixed.turns, alone.turns, strict=True):
        assert {n: r.token_ids for n, r in a.replies.items()} == {n: r.token_ids for n, r in b.replies.items()}


def test_each_variant_keeps_its_own_history(session, tiny_llama, llama_adapters):
    conversation = two_turns(session, True)
    history = conversation.messages_for("alpha")
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[2]["content"] == conversation.turns[0].replies["alpha"].text
    assert conversation.messages_for("beta")[2]["content"] == conversation.turns[0].replies["beta"].text

    # the second turn of alpha equals PEFT generating on alpha's own history
    model = factories.peft_model(tiny_llama, {"alpha": llama_adapters["alpha"]}, active="alpha")
    ids = chat_prompt_ids(session.tokenizer, history[:4])
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=session.tokenizer.pad_token_id or 0,
        )
    expected = out[0, len(ids) :].tolist()
    got = list(conversation.turns[1].replies["alpha"].token_ids)
    assert got == expected[: len(got)] and len(got) >= 1
    doc = conversation.to_json()
    assert doc["kind"] == "conversation" and len(doc["turns"]) == 2 and "alpha" in doc["turns"][1]["replies"]


def test_bad_messages_are_one_line(session):
    with pytest.raises(UserError, match="empty"):
        chat_turn(session, VARIANTS, Conversation(), "   ", SETTINGS)
    with pytest.raises(UserError, match="no variants"):
        chat_turn(session, [], Conversation(), "hi", SETTINGS)
