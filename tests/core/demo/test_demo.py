"""The embedded demo model: converted once from the wheel's GGUF, then loaded as safetensors."""

import json

import pytest

from lora_studio.core.demo import model as demo
from lora_studio.core.model.estimate import read_footprint

DEMO_PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings counted once


def test_demo_wheel_is_installed():
    path = demo.demo_gguf_path()
    assert path is not None and path.name == demo.DEMO_GGUF


@pytest.mark.slow
def test_demo_converts_loads_and_generates():
    from lora_studio.core.generation.generate import GenerationSettings, generate
    from lora_studio.core.session import Session

    source = demo.ensure_demo_model()  # converts on the first run on a machine, reuses afterwards
    folder = source.path
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    assert read_footprint(source).params == DEMO_PARAMS
    session = Session()
    session.load(source)
    out = generate(
        session.model, session.tokenizer, "What is the capital of France?", GenerationSettings(max_new_tokens=8)
    )
    assert "Paris" in out.text
    session.close()


def test_gguf_footprint_and_shapes_without_loading():
    from lora_studio.core.model.sources import resolve_source
    from lora_studio.core.report.inspect_report import base_weight_shapes

    source = resolve_source(demo.demo_gguf_path())
    assert source.kind == "gguf" and source.gguf_file == demo.DEMO_GGUF
    fp = read_footprint(source)
    assert fp.params == DEMO_PARAMS and fp.tied_embeddings and fp.checkpoint_dtype.startswith("gguf:")
    shapes = base_weight_shapes(source)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)


def test_list_local_models_includes_demo_and_extra_dirs(tiny_llama):
    from lora_studio.core.demo.model import list_local_models

    found = list_local_models(extra_dirs=(tiny_llama.parent,))
    kinds = {s.kind for s in found}
    assert "demo" in kinds
    assert any(s.path == tiny_llama for s in found)


def test_list_local_models_includes_the_models_folder_once_each(tiny_llama, data_dir):
    """LoRA Studio's models folder (the demo's, where a merge of the demo is suggested) is listed; the demo's own
    folder and a folder named twice come once."""
    import shutil

    from lora_studio.core.demo.model import demo_folder, list_local_models

    merged = demo_folder().parent / "demo-pirate-merged"
    shutil.copytree(tiny_llama, merged)
    shutil.copytree(tiny_llama, demo_folder())  # as if converted: a folder with a config.json
    found = list_local_models(extra_dirs=(demo_folder().parent,))
    files = [s.file for s in found]
    assert files.count(merged.absolute()) == 1 and demo_folder().absolute() not in files
