"""The session against PEFT itself: attach, switch, disable, delete, unload."""

import factories
import pytest
import torch

from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session
from lora_studio.core.tasks import CancelToken

IDS = torch.tensor([[5, 17, 42, 99, 120, 7]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def session(tiny_llama):
    s = Session()
    s.load(resolve_source(tiny_llama))
    yield s
    s.close()


def test_attach_switch_disable_match_peft(session, tiny_llama, llama_adapters):
    base_logits = logits(session.model)
    session.attach(llama_adapters["alpha"], "alpha")
    session.attach(llama_adapters["beta"], "beta")
    assert session.active_adapter == "beta"
    ref = factories.peft_model(tiny_llama, llama_adapters)
    for name in ("alpha", "beta"):
        session.activate(name)
        ref.set_adapter(name)
        assert session.state().active_adapter == name
        assert torch.allclose(logits(session.model), logits(ref), atol=1e-6)
        assert not torch.allclose(logits(session.model), base_logits, atol=1e-4)
    session.disable_adapters()
    assert session.active_adapter is None
    assert torch.allclose(logits(session.model), base_logits, atol=1e-6)
    session.activate("alpha")
    assert session.active_adapter == "alpha"


def test_delete_and_unload(session, llama_adapters):
    base_logits = logits(session.model)
    session.attach(llama_adapters["alpha"], "alpha")
    session.attach(llama_adapters["beta"], "beta")
    session.delete("beta")
    assert session.active_adapter == "alpha" and list(session.adapters) == ["alpha"]
    alpha_logits = logits(session.model)
    session.delete("alpha")
    assert session.active_adapter is None and not session.is_peft
    assert torch.allclose(logits(session.model), base_logits, atol=1e-6)
    session.attach(llama_adapters["alpha"], "alpha")
    assert torch.allclose(logits(session.model), alpha_logits, atol=1e-6)
    session.attach(llama_adapters["beta"], "beta")
    session.unload_all()
    assert not session.adapters and not session.is_peft
    assert torch.allclose(logits(session.model), base_logits, atol=1e-6)


def test_adapter_sizes_are_reported(session, llama_adapters):
    a = session.attach(llama_adapters["alpha"], "alpha")
    b = session.attach(llama_adapters["beta"], "beta")
    assert a.size_bytes == 896 * 4  # 4 modules x (4x32 + out x 4) float32 params
    assert b.size_bytes > a.size_bytes
    assert [x[0] for x in session.state().adapters] == ["alpha", "beta"]


def test_wrong_adapter_is_refused_and_session_unchanged(session, wide_adapter, llama_adapters):
    session.attach(llama_adapters["alpha"], "alpha")
    with pytest.raises(
        UserError, match=r"model\.layers\.0\.self_attn\.q_proj: adapter expects in=64,out=64, base has in=32,out=32"
    ):
        session.attach(wide_adapter, "wide")
    assert list(session.adapters) == ["alpha"] and session.active_adapter == "alpha"


def test_bad_names_and_duplicates(session, llama_adapters):
    session.attach(llama_adapters["alpha"], "alpha")
    with pytest.raises(UserError, match="already attached"):
        session.attach(llama_adapters["alpha"], "alpha")
    for bad in (" ", "a.b", "__base__", "two words"):
        with pytest.raises(UserError):
            session.attach(llama_adapters["beta"], bad)
    with pytest.raises(UserError, match="no adapter named"):
        session.activate("ghost")


def test_nothing_loaded():
    with pytest.raises(UserError, match="no base model is loaded"):
        Session().attach("/tmp", "x")


def test_cancel_during_load_leaves_session_empty(tiny_llama):
    s = Session()
    token = CancelToken()
    seen = []

    def report(p):
        seen.append(p)
        if p.unit == "tensors" and p.done >= 2:
            token.cancel()

    with pytest.raises(Cancelled):
        s.load(resolve_source(tiny_llama), cancel=token, report=report)
    assert not s.loaded
    assert any(p.total and p.unit == "tensors" for p in seen), "per-tensor progress was reported"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_in_dtype(tiny_llama, dtype):
    s = Session()
    state = s.load(resolve_source(tiny_llama), dtype=dtype)
    assert state.dtype == dtype and next(s.model.parameters()).dtype == getattr(torch, dtype)
    assert state.params == 39072 and state.device == "cpu"


def test_zero_update_adapter_is_flagged(session, tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "fresh"))  # default init: B = 0, no effect
    attached = session.attach(tmp_path / "fresh", "fresh")
    assert any("does not change the model's outputs" in w for w in attached.warnings)


def test_added_tokens_adapter_resizes_with_its_tokenizer(session, tiny_llama, tmp_path):
    from lora_studio.core.adapters.compatibility import VocabularyMismatch

    bigger = factories.make_llama(tmp_path / "big", vocab_size=330)
    adapter = factories.make_adapter(bigger, tmp_path / "added", modules_to_save=["lm_head", "embed_tokens"])
    tok = factories.make_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(10)])
    tok.save_pretrained(str(adapter))
    with pytest.raises(VocabularyMismatch, match=r"vocabulary of 330 tokens; .* has 320"):
        session.attach(adapter, "added")
    session.attach(adapter, "added", resize_embeddings=True)
    assert session.tokenizer_source == adapter and len(session.tokenizer) == len(tok)
    assert session.model.get_input_embeddings().weight.shape[0] == 330
    ids = torch.tensor([[*session.tokenizer.convert_tokens_to_ids(["<extra9>"]), 3, 4]])
    assert session.model(input_ids=ids).logits.shape[-1] == 330  # the added token embeds and is predicted


def test_variant_selected_switches_for_the_block_and_restores(session, llama_adapters):
    base_logits = logits(session.model)
    session.attach(llama_adapters["alpha"], "alpha")
    session.attach(llama_adapters["beta"], "beta")
    session.activate("alpha")
    alpha_logits = logits(session.model)
    session.activate("beta")
    beta_logits = logits(session.model)
    before = session.state()
    with session.variant_selected("alpha") as model:
        assert torch.allclose(logits(model), alpha_logits, atol=1e-6)
        with session.variant_selected(None):  # blocks nest: the inner one gives back alpha, not the user's beta
            assert torch.allclose(logits(model), base_logits, atol=1e-6)
        assert torch.allclose(logits(model), alpha_logits, atol=1e-6)
        assert session.state() == before  # the snapshot keeps the user's selection
    assert session.state() == before and torch.allclose(logits(session.model), beta_logits, atol=1e-6)
    session.disable_adapters()
    with pytest.raises(RuntimeError), session.variant_selected("alpha"):
        raise RuntimeError("the job failed")
    assert session.state().adapters_enabled is False and torch.allclose(logits(session.model), base_logits, atol=1e-6)
    with session.mixed_batch_selected() as model:
        assert torch.allclose(logits(model), beta_logits, atol=1e-6)  # layers on, the active adapter unchanged
    assert torch.allclose(logits(session.model), base_logits, atol=1e-6)
    with pytest.raises(UserError, match="no adapter named 'zeta'"), session.variant_selected("zeta"):
        pass


def test_adapters_are_read_only_and_combinations_go_through_the_session(session, llama_adapters):
    session.attach(llama_adapters["alpha"], "alpha")
    session.attach(llama_adapters["beta"], "beta")
    session.activate("alpha")
    with pytest.raises(TypeError):
        session.adapters["x"] = session.adapters["alpha"]  # type: ignore[index]
    mix = session.register_combination("mix", {"alpha": 0.5, "beta": 0.5}, "cat")
    assert list(session.adapters) == ["alpha", "beta", "mix"] and session.active_adapter == "alpha"
    assert mix.size_bytes > 0 and "combination (cat)" in str(mix.path)
    session.delete("mix")
    before = session.state()
    with session.temporary_combination("tmp", [("alpha", 0.7), ("beta", 0.3)], "cat") as name:
        assert name == "tmp" and "tmp" in session.model.peft_config and "tmp" not in session.adapters
        with session.variant_selected(name) as model:
            combined = logits(model)
        assert session.state() == before
    assert "tmp" not in session.model.peft_config and session.state() == before
    for part in ("alpha", "beta"):  # the combination differs from both of its parts
        session.activate(part)
        assert not torch.allclose(combined, logits(session.model), atol=1e-4)
