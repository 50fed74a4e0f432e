"""The traps of issue 7: inputs that load fine but would silently give a wrong model if nothing checked them."""

from __future__ import annotations

import json
import shutil

import factories
import pytest
import torch

from lora_studio.core.errors import UserError
from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save, plan_merge
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session

QUICK = dict(verify_prompts=("The quick brown fox",), verify_tokens=4)
IDS = torch.tensor([[5, 17, 42, 99, 120, 7]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- resized vocabulary (added tokens; embed_tokens / lm_head in modules_to_save) -------------------------------------


def _check_resized_folder(out, adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert json.loads((out / "config.json").read_text())["vocab_size"] == 330
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(adapter))) and "<extra9>" in tok.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == 330
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    head = next(v for k, v in saved.items() if "lm_head" in k)
    assert torch.equal(model.lm_head.weight, head)  # the adapter's trained head, all 330 rows


def test_resized_vocabulary_merge_saves_the_adapters_tokenizer(tiny_llama, added_tokens_adapter, tmp_path):
    session = Session()
    session.load(resolve_source(tiny_llama))
    session.attach(added_tokens_adapter, "added", resize_embeddings=True)
    plan = plan_merge(
        session.source, [AdapterSpec("added", added_tokens_adapter)], MergeOptions(out=tmp_path / "o"), session=session
    )
    assert plan.engine == "in-memory" and "resized" in plan.predictions["streaming"].reason
    result = merge_and_save(
        session.source,
        [AdapterSpec("added", added_tokens_adapter)],
        MergeOptions(out=tmp_path / "merged", **QUICK),
        session=session,
    )
    assert result.verification.status == "pass"
    _check_resized_folder(tmp_path / "merged", added_tokens_adapter)
    session.close()


def test_resized_vocabulary_merge_without_a_session(tiny_llama, added_tokens_adapter, tmp_path):
    """The CLI path: detected from header shapes, the base resized to the adapter's own tokenizer."""
    plan = plan_merge(
        resolve_source(tiny_llama), [AdapterSpec("added", added_tokens_adapter)], MergeOptions(out=tmp_path / "o")
    )
    assert plan.resize_vocabulary and plan.engine == "in-memory"
    merge_and_save(
        resolve_source(tiny_llama),
        [AdapterSpec("added", added_tokens_adapter)],
        MergeOptions(out=tmp_path / "merged", verify=False),
    )
    _check_resized_folder(tmp_path / "merged", added_tokens_adapter)


def test_resized_vocabulary_without_a_tokenizer_is_refused(tiny_llama, added_tokens_adapter, tmp_path):
    adapter = shutil.copytree(added_tokens_adapter, tmp_path / "no-tok")
    for p in adapter.glob("*token*"):
        p.unlink()
    with pytest.raises(UserError, match=r"vocabulary of 330 tokens; tiny-llama has 320"):
        merge_and_save(
            resolve_source(tiny_llama), [AdapterSpec("x", adapter)], MergeOptions(out=tmp_path / "o", verify=False)
        )
    assert not (tmp_path / "o").exists()


# -- adapter keys that match no module --------------------------------------------------------------------------------


def test_keys_matching_no_module_are_refused_by_name(tiny_llama, llama_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(llama_adapters["alpha"], tmp_path / "renamed")
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.query"): v for k, v in tensors.items()}
    save_file(renamed, adapter / "adapter_model.safetensors")
    session = Session()
    session.load(resolve_source(tiny_llama))
    with pytest.raises(UserError, match=r"adapts modules tiny-llama does not have: model\.layers\.1\.self_attn\.query"):
        session.attach(adapter, "renamed")
    assert not session.is_peft and session.adapters == {}
    with pytest.raises(UserError, match=r"does not have: model\.layers\.1\.self_attn\.query"):
        merge_and_save(session.source, [AdapterSpec("r", adapter)], MergeOptions(out=tmp_path / "o", verify=False))
    assert not (tmp_path / "o").exists()
    # a good adapter really changes the outputs once attached (PEFT only warns about keys it could not place)
    base = logits(session.model)
    attached = session.attach(llama_adapters["alpha"], "alpha")
    assert not attached.warnings
    assert (logits(session.model) - base).abs().max() > 1e-3
    session.close()


def test_newer_peft_setting_is_refused_with_the_recorded_version(tiny_llama, llama_adapters, tmp_path):
    adapter = shutil.copytree(llama_adapters["alpha"], tmp_path / "future")
    factories.edit_adapter_config(adapter, lora_hyperdrive=4, peft_version="0.99.0")
    session = Session()
    session.load(resolve_source(tiny_llama))
    with pytest.raises(UserError, match=r"lora_hyperdrive \(saved by PEFT 0\.99\.0\)"):
        session.attach(adapter, "future")
    factories.edit_adapter_config(adapter, lora_hyperdrive=None, harmless_flag=False)  # a default value: only a warning
    attached = session.attach(adapter, "future")
    assert any("harmless_flag" in w for w in attached.warnings)
    session.close()


# -- tied embeddings with a trained lm_head ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["modules_to_save", "lora_on_lm_head"])
def test_tied_base_with_a_trained_head_is_not_retied(kind, tiny_llama_tied, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if kind == "modules_to_save":
        adapter = factories.make_adapter(tiny_llama_tied, tmp_path / "ad", modules_to_save=["lm_head"], seed=33)
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors = {k: (v + 0.25 if "lm_head" in k else v) for k, v in tensors.items()}  # the head was trained
        save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    else:
        adapter = factories.make_adapter(
            tiny_llama_tied, tmp_path / "ad", target_modules=("q_proj", "lm_head"), seed=34
        )
    out = tmp_path / "merged"
    result = merge_and_save(
        resolve_source(tiny_llama_tied), [AdapterSpec("a", adapter)], MergeOptions(out=out, **QUICK)
    )
    assert result.verification.status == "pass", result.verification.summary()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    reference = factories.peft_model(tiny_llama_tied, {"a": adapter})
    assert torch.allclose(logits(merged), logits(reference), atol=1e-5)  # behaves like the adapter model
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_tied))
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the input side is untouched


# -- what the merged folder must and must not contain ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_eos_base(models_dir):
    base = factories.make_llama(models_dir / "trap-two-eos", seed=35)
    gen = json.loads((base / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 1]
    (base / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return base


@pytest.mark.parametrize("engine", ["streaming", "in-memory"])
def test_merged_folder_keeps_the_eos_list_and_has_no_adapter_config(engine, two_eos_base, tmp_path):
    from transformers import GenerationConfig

    adapter = factories.make_adapter(two_eos_base, tmp_path / "ad", seed=36)
    out = tmp_path / "merged"
    merge_and_save(
        resolve_source(two_eos_base), [AdapterSpec("a", adapter)], MergeOptions(out=out, engine=engine, verify=False)
    )
    assert not (out / "adapter_config.json").exists() and not list(out.glob("adapter_model*"))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 1]
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == [2, 1]


# -- quantized bases ---------------------------------------------------------------------------------------------------


@pytest.fixture
def quantized_base(tiny_llama, tmp_path):
    base = shutil.copytree(tiny_llama, tmp_path / "tiny-llama-4bit")
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_merge_refuses_a_quantized_base(quantized_base, llama_adapters, tmp_path, capsys):
    from lora_studio.cli.main import main

    for engine in ("streaming", "in-memory"):
        with pytest.raises(
            UserError, match=r"quantized \(bitsandbytes 4-bit\): merging into quantized weights would round"
        ):
            merge_and_save(
                resolve_source(quantized_base),
                [AdapterSpec("a", llama_adapters["alpha"])],
                MergeOptions(out=tmp_path / "o", engine=engine, verify=False),
            )
    assert (
        main(
            [
                "merge",
                str(quantized_base),
                "--adapter",
                str(llama_adapters["alpha"]),
                "--out",
                str(tmp_path / "o"),
                "--json",
            ]
        )
        == 2
    )
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "bitsandbytes 4-bit" in err
    assert not (tmp_path / "o").exists()


def test_session_says_why_a_quantized_base_does_not_load(quantized_base):
    pytest.importorskip("transformers")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - where bitsandbytes is installed the load may work (GPU); merging is still refused
        pytest.skip("bitsandbytes is installed")
    session = Session()
    with pytest.raises(
        UserError,
        match=r"tiny-llama-4bit is quantized \(bitsandbytes 4-bit\) and cannot be loaded here: .*bitsandbytes",
    ):
        session.load(resolve_source(quantized_base))
    assert not session.loaded


def test_a_session_holding_a_quantized_model_is_not_merged(tiny_llama, llama_adapters, tmp_path):
    session = Session()
    session.load(resolve_source(tiny_llama))
    session.attach(llama_adapters["alpha"], "alpha")
    session.quantization = (
        "bitsandbytes 8-bit"  # what load() records for a base loaded quantized (needs bitsandbytes + GPU)
    )
    with pytest.raises(UserError, match=r"quantized \(bitsandbytes 8-bit\)"):
        merge_and_save(
            session.source,
            [AdapterSpec("alpha", llama_adapters["alpha"])],
            MergeOptions(out=tmp_path / "o", engine="in-memory", verify=False),
            session=session,
        )
    assert not (tmp_path / "o").exists()
    session.close()
