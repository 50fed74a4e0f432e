"""Compatibility is decided from shapes before attaching, with messages that name the module."""

import factories
import pytest

from lora_studio.core.adapters import compatibility
from lora_studio.core.errors import UserError


def test_matching_adapter_passes(tiny_llama, llama_adapters):
    shapes = compatibility.weight_shapes_from_headers(tiny_llama)
    result = compatibility.check(llama_adapters["alpha"], shapes, base_identity=(str(tiny_llama),))
    assert result.modules == 4 and result.warnings == []


def test_shape_mismatch_names_module_and_both_shapes(tiny_llama, wide_adapter):
    shapes = compatibility.weight_shapes_from_headers(tiny_llama)
    with pytest.raises(UserError) as err:
        compatibility.check(wide_adapter, shapes)
    assert str(err.value).startswith(
        "model.layers.0.self_attn.q_proj: adapter expects in=64,out=64, base has in=32,out=32"
    )


def test_other_architecture(tiny_llama, gpt2_adapter):
    shapes = compatibility.weight_shapes_from_headers(tiny_llama)
    with pytest.raises(
        UserError, match=r"transformer\.h\.0\.attn\.c_attn, which this base does not have|another architecture"
    ):
        compatibility.check(gpt2_adapter, shapes, base_label="this base", architecture="LlamaForCausalLM")


def test_conv1d_fan_in_fan_out_shapes(tiny_gpt2, gpt2_adapter):
    shapes = compatibility.weight_shapes_from_headers(tiny_gpt2)
    assert compatibility.check(gpt2_adapter, shapes).modules == 2


def test_different_base_name_is_only_a_warning(tiny_llama, llama_adapters, tmp_path):
    adapter = factories.make_adapter(tiny_llama, tmp_path / "renamed")
    factories.edit_adapter_config(adapter, base_model_name_or_path="someone/other-model")
    shapes = compatibility.weight_shapes_from_headers(tiny_llama)
    result = compatibility.check(adapter, shapes, base_identity=("tiny-llama", str(tiny_llama)))
    assert any("someone/other-model" in w for w in result.warnings)


def test_partial_module_match_is_refused(tiny_llama, tmp_path):
    adapter = factories.make_adapter(tiny_llama, tmp_path / "ad")
    shapes = compatibility.weight_shapes_from_headers(tiny_llama)
    del shapes["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(UserError, match=r"does not have: model\.layers\.1\.self_attn\.q_proj"):
        compatibility.check(adapter, shapes)


def test_resized_vocabulary_modules_to_save(tiny_llama, tmp_path, models_dir):
    big_vocab = factories.make_llama(tmp_path / "bigvocab", vocab_size=400)
    adapter = factories.make_adapter(big_vocab, tmp_path / "ad", modules_to_save=["lm_head"])
    shapes = compatibility.weight_shapes_from_headers(tiny_llama)
    with pytest.raises(compatibility.VocabularyMismatch, match=r"vocabulary of 400 tokens; the base has 320") as err:
        compatibility.check(adapter, shapes)
    assert (err.value.adapter_vocab, err.value.base_vocab, err.value.adapter_has_tokenizer) == (400, 320, False)


def test_tied_base_accepts_lm_head_target(tiny_llama_tied, tmp_path):
    adapter = factories.make_adapter(tiny_llama_tied, tmp_path / "ad", target_modules=("q_proj", "lm_head"))
    shapes = compatibility.weight_shapes_from_headers(tiny_llama_tied)
    assert "lm_head.weight" not in shapes
    assert compatibility.check(adapter, shapes).modules == 3
