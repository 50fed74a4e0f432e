"""Reading adapter folders: configs, weights, and the clear refusals for broken ones."""

import factories
import pytest
import torch

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError


@pytest.fixture
def adapter(tiny_llama, tmp_path):
    return factories.make_adapter(tiny_llama, tmp_path / "ad")


def test_reads_config(adapter):
    cfg = adapter_files.read_adapter_config(adapter)
    assert cfg.peft_type == "LORA" and cfg.r == 4 and cfg.scaling == 2.0
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0


@pytest.mark.parametrize(
    "content,needle",
    [
        ("", "is empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"peft_type": "IA3"}', "IA3 adapter"),
        ('{"peft_type": "FANCY_NEW"}', "unknown peft_type"),
        ('{"r": 4}', "no peft_type"),
    ],
)
def test_broken_configs(adapter, content, needle):
    (adapter / "adapter_config.json").write_text(content)
    with pytest.raises(UserError, match=needle):
        adapter_files.read_adapter_config(adapter)


def test_future_peft_keys(adapter):
    factories.edit_adapter_config(adapter, shiny_new_option=True, peft_version="9.9.0")
    with pytest.raises(UserError, match=r"shiny_new_option.*PEFT 9\.9\.0"):
        adapter_files.read_adapter_config(adapter)
    factories.edit_adapter_config(adapter, shiny_new_option=None, harmless_new_option=False)
    cfg = adapter_files.read_adapter_config(adapter)
    assert any("harmless_new_option" in w for w in cfg.warnings)


def test_missing_and_odd_folders(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="does not exist"):
        adapter_files.check_adapter_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        adapter_files.check_adapter_folder(tmp_path / "empty")
    with pytest.raises(UserError, match="full model"):
        adapter_files.check_adapter_folder(tiny_llama)


def test_weights_missing_or_directory(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter weights"):
        adapter_files.weights_file(adapter)
    (adapter / "adapter_model.safetensors").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        adapter_files.weights_file(adapter)


def test_truncated_weights(adapter):
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        adapter_files.load_tensors(adapter)


def test_bin_is_read_with_weights_only(adapter, tmp_path):
    tensors = adapter_files.load_tensors(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model." + k: v for k, v in tensors.items()}, adapter / "adapter_model.bin")
    assert adapter_files.load_tensors(adapter).keys() == tensors.keys()


def test_malicious_pickle_is_refused_and_not_executed(adapter, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (adapter / "adapter_model.safetensors").unlink()
    import pickle

    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(UserError, match="refused"):
        adapter_files.load_tensors(adapter)
    assert not marker.exists()


def test_layout_groups_keys():
    lay = adapter_files.layout(
        [
            "model.layers.0.q_proj.lora_A.weight",
            "model.layers.0.q_proj.lora_B.weight",
            "model.layers.0.q_proj.lora_magnitude_vector",
            "model.embed_tokens.lora_embedding_A",
            "model.embed_tokens.lora_embedding_B",
            "lm_head.weight",
            "model.embed_tokens.token_adapter.trainable_tokens_delta",
            "weird.thing",
        ]
    )
    assert lay.lora["model.layers.0.q_proj"].magnitude
    assert lay.lora["model.embed_tokens"].kind == "embedding"
    assert lay.full_weights == {"lm_head.weight": "lm_head.weight"}
    assert lay.trainable_tokens == {"model.embed_tokens": "model.embed_tokens.token_adapter.trainable_tokens_delta"}
    assert lay.unknown == ["weird.thing"]
