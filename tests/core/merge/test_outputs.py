"""What a merged folder says about itself: the model card's front matter (base_model, library, tags, license) and a
config.json without the path the base was loaded from."""

from __future__ import annotations

import json
import shutil

import factories
import pytest

from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save
from lora_studio.core.merge.model_card import front_matter
from lora_studio.core.merge.outputs import base_license, hub_name
from lora_studio.core.model.sources import resolve_source

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def installed_base(tmp_path, tiny_llama):
    """A base whose config names the folder it was loaded from (as the demo's does) and whose README has a license."""
    base = tmp_path / "site-packages" / "some_model"
    shutil.copytree(tiny_llama, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["_name_or_path"] = str(base)
    (base / "config.json").write_text(json.dumps(cfg))
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# Some model\n")
    return base


@pytest.fixture
def hub_adapters(tmp_path, installed_base, llama_adapters):
    out = {}
    for name, path in llama_adapters.items():
        copy = tmp_path / f"hub-{name}"
        shutil.copytree(path, copy)
        factories.edit_adapter_config(copy, base_model_name_or_path="someorg/tiny-llama")
        out[name] = copy
    return out


def card_front_matter(folder) -> list[str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return text.split("---\n")[1].splitlines()


@pytest.mark.parametrize("engine", ["streaming", "in-memory"])
def test_card_front_matter_and_config(tmp_path, installed_base, hub_adapters, engine):
    out = tmp_path / f"merged-{engine}"
    merge_and_save(
        resolve_source(installed_base),
        [AdapterSpec("alpha", hub_adapters["alpha"])],
        MergeOptions(out=out, engine=engine, verify=False),
    )
    assert card_front_matter(out) == [
        "base_model: someorg/tiny-llama",
        "library_name: transformers",
        "license: apache-2.0",
        "tags:",
        "- lora",
        "- merged",
        "- peft",
        "- lora-studio",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert "_name_or_path" not in cfg and str(tmp_path) not in json.dumps(cfg)
    assert cfg["dtype"] == "float32"


def test_hub_name_and_license_rules(tmp_path, tiny_llama, llama_adapters, installed_base):
    plain = resolve_source(tiny_llama)
    assert base_license(plain) is None and base_license(resolve_source(installed_base)) == "apache-2.0"
    # factories' adapters name a local folder as their base: no hub id from them, nor from a local _name_or_path
    assert hub_name(resolve_source(installed_base), [AdapterSpec("a", llama_adapters["alpha"])]) is None
    cfg_named = tmp_path / "named"
    shutil.copytree(tiny_llama, cfg_named)
    cfg = json.loads((cfg_named / "config.json").read_text())
    cfg["_name_or_path"], cfg["license"] = "org/base-model", "mit"
    (cfg_named / "config.json").write_text(json.dumps(cfg))
    assert hub_name(resolve_source(cfg_named)) == "org/base-model" and base_license(resolve_source(cfg_named)) == "mit"
    lines = front_matter({"base": {"hub_id": None, "license": "other: see LICENSE"}})
    assert lines[1:3] == ["library_name: transformers", 'license: "other: see LICENSE"']  # YAML-safe quoting


def test_a_merge_from_a_gguf_base_names_its_architecture_and_the_file_it_hashed(
    tmp_path, gguf_llama, gguf_llama_adapters
):
    """A GGUF's config carries no `architectures`: the merged folder gets the model's class (as save_pretrained
    writes it, and as llama.cpp's convert_hf_to_gguf.py reads it), and the card calls the GGUF's hash the GGUF's."""
    from transformers import AutoModelForCausalLM

    from lora_studio.core.export import ExportRequest, export_gguf
    from lora_studio.core.io.hashing import file_sha256
    from lora_studio.core.session import Session

    gguf = export_gguf(
        ExportRequest(resolve_source(gguf_llama), tmp_path / "base.f32.gguf", "gguf", "f32", verify=False)
    )
    source = resolve_source(gguf.out)
    session = Session()
    session.load(source)
    session.attach(gguf_llama_adapters["alpha"], "alpha")
    out = tmp_path / "merged"
    merge_and_save(
        source, [AdapterSpec("alpha", gguf_llama_adapters["alpha"], 1.0)], MergeOptions(out=out), session=session
    )
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    card = (out / "README.md").read_text()
    assert f"(base.f32.gguf sha256 `{file_sha256(gguf.out)}`)" in card and "config.json sha256" not in card
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
