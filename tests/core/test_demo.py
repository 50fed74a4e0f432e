"""The embedded demo model: converted once from the wheel's GGUF, then loaded as safetensors."""

import json

import pytest

from lora_studio.core import demo
from lora_studio.core.estimate import read_footprint

DEMO_PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings counted once


def test_demo_wheel_is_installed():
    path = demo.demo_gguf_path()
    assert path is not None and path.name == demo.DEMO_GGUF


@pytest.mark.slow
def test_demo_converts_loads_and_generates():
    from lora_studio.core.generation import GenerationSettings, generate
    from lora_studio.core.session import Session

    source = demo.ensure_demo_model()  # converts on the first run on a machine, reuses afterwards
    folder = source.path
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    assert read_footprint(source).params == DEMO_PARAMS
    session = Session()
    session.load(source)
    out = generate(session.model, session.tokenizer, "What is the capital of France?", GenerationSettings(max_new_tokens=8))
    assert "Paris" in out.text
    session.close()
