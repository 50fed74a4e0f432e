"""Loading is safe by default: no remote code, no unpickling of code; and it can be cancelled."""

import json
import os
import pickle
import shutil

import pytest

from lora_studio.core.errors import UserError
from lora_studio.core.model import loading, sources


def _custom_code_model(base, folder, model_type, marker):
    shutil.copytree(base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("modeling_custom.py", "configuration_custom.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


def test_remote_code_is_not_run_by_default(tiny_llama, tmp_path):
    marker = tmp_path / "ran"
    folder = _custom_code_model(tiny_llama, tmp_path / "custom", "my_custom_arch", marker)
    with pytest.raises(
        UserError,
        match=r"needs its own Python code to load \(configuration_custom\.py, modeling_custom\.py\); it was not run",
    ):
        loading.load_base(sources.resolve_source(folder))
    assert not marker.exists()


def test_known_architecture_with_auto_map_loads_natively(tiny_llama, tmp_path):
    marker = tmp_path / "ran"
    folder = _custom_code_model(tiny_llama, tmp_path / "custom", "llama", marker)
    model, _ = loading.load_base(sources.resolve_source(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_malicious_base_pickle_is_refused(tiny_llama, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)
    with pytest.raises(UserError, match="refused because it is not plain tensors"):
        loading.load_base(sources.resolve_source(folder))
    assert not marker.exists()


def test_plain_bin_checkpoint_loads(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    from lora_studio.core.model.estimate import read_footprint

    folder = tmp_path / "binmodel"
    shutil.copytree(tiny_llama, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    source = sources.resolve_source(folder)
    assert read_footprint(source).params == 39072
    model, _ = loading.load_base(source)
    assert sum(p.numel() for p in model.parameters()) == 39072


def test_missing_shard_is_a_clear_error(tiny_llama, tmp_path):
    from lora_studio.core.session import Session

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    with pytest.raises(UserError, match=r"model-00002-of-00002.safetensors but it is missing"):
        Session().load(sources.resolve_source(folder))


def test_a_gguf_base_loads_as_its_file_says_or_is_refused_in_one_line(gguf_llama, tmp_path):
    """transformers once read a float32 GGUF as other numbers, silently: a GGUF base holds the file's weights
    (within its quantisation) or is refused; an embedding that differs from the file's is caught."""
    import torch
    from safetensors.torch import load_file

    from lora_studio.core.export import ExportRequest, export_gguf

    original = load_file(next(gguf_llama.glob("*.safetensors")))["model.layers.0.mlp.up_proj.weight"]
    for type_name, tolerance in (("f32", 1e-6), ("q8_0", 5e-2)):  # a GGUF load takes ~20 s: the two ends
        out = tmp_path / f"base.{type_name}.gguf"
        export_gguf(ExportRequest(sources.resolve_source(gguf_llama), out, "gguf", type_name, verify=False))
        try:
            model = loading.load_model(sources.resolve_source(out))
        except UserError as exc:
            assert "read this GGUF's weights wrongly" in str(exc) and "\n" not in str(exc), type_name
            continue
        loaded = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
        assert float((loaded - original).abs().max()) < tolerance * float(original.abs().max()), type_name
    with torch.no_grad():
        model.get_input_embeddings().weight[1] += 1.0  # what a misread looks like: rows that are not the file's
    with pytest.raises(UserError, match="read this GGUF's weights wrongly"):
        loading._check_gguf_read(model, sources.resolve_source(tmp_path / "base.q8_0.gguf"))
    # a training estimate on the GGUF counts the activations and logits the folder's does (its sizes from metadata)
    from lora_studio.core.train import TrainSettings
    from lora_studio.core.train.estimate import training_memory

    from_gguf = training_memory(sources.resolve_source(tmp_path / "base.q8_0.gguf"), TrainSettings())
    from_folder = training_memory(sources.resolve_source(gguf_llama), TrainSettings())
    assert from_gguf.activations == from_folder.activations > 0 and from_gguf.logits == from_folder.logits > 0


def test_a_load_lets_go_of_its_checkpoints_pages_as_it_reads_and_loads_the_same_weights(tiny_llama, monkeypatch):
    """The checkpoint's mapped pages are let go of while transformers reports its tensors (their RSS; the page cache
    keeps them), and what loads is what the file holds (docs/benchmarks.md, bench_quantized.py)."""
    import torch
    from safetensors.torch import load_file

    from lora_studio.core.system import allocator

    released: list[tuple[list, int]] = []
    release = allocator.release_mapped_pages

    def recorded(files):
        released.append((list(files), freed := release(files)))
        return freed

    monkeypatch.setattr(allocator, "release_mapped_pages", recorded)
    model = loading.load_model(sources.resolve_source(tiny_llama))
    assert released and all(files == [tiny_llama / "model.safetensors"] for files, _ in released)
    state = model.state_dict()
    for name, tensor in load_file(tiny_llama / "model.safetensors").items():
        assert torch.equal(state[name], tensor), name
