"""Every tested architecture through llama.cpp's own converter, merged and adapter-only, answered by llama.cpp.

Tiny real models of ten families (``arch_zoo``), each with a PEFT LoRA on every linear layer: the merged GGUF holds
exactly the tensors llama.cpp's converter writes from the PEFT-merged Hugging Face folder, and llama.cpp's logits
(float32 KV cache), merged or with the adapter-only file applied to the base's GGUF, are PEFT's within float32 noise;
Gemma's within llama.cpp's float16 GELU table (about 1e-3 on these logits).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import arch_zoo
import factories
import pytest

from lora_studio.core.export import ExportRequest, export_gguf
from lora_studio.core.export.runtime import GgufRunner
from lora_studio.core.model.sources import resolve_source

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's binding is installed by `make test`")

PROMPT = [2, 50, 60, 70, 80, 90, 100]
TOLERANCE = 1e-4
GELU_TABLE_TOLERANCE = 3e-3  # llama.cpp's CPU GELU reads a float16 table (Gemma's activation)
TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "added_tokens", "generation_config")


def export(base: Path, out: Path, fmt: str, type_name: str, adapter: Path | None = None, **kw):
    request = ExportRequest(resolve_source(base), out, fmt, type_name, adapter=adapter, verify=False, **kw)
    return export_gguf(request)


def gguf_tensors(path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: bytes(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def peft_logits(base: Path, adapter: Path | None):
    import torch
    from transformers import AutoModelForCausalLM

    model = factories.peft_model(base, {"a": adapter}) if adapter else AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT])).logits[0].numpy()


def merged_folder(base: Path, adapter: Path, folder: Path) -> Path:
    """The seed recipe: PEFT's merge_and_unload, save_pretrained, and the base's tokenizer files beside it."""
    factories.peft_model(base, {"a": adapter}).merge_and_unload().save_pretrained(folder)
    for file in base.iterdir():
        if file.name.startswith(TOKENIZER_FILES):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize("family", arch_zoo.FAMILIES)
def test_merged_and_adapter_only_ggufs_are_llama_cpps_own_and_answer_as_peft(family, tmp_path):
    base = arch_zoo.make_family(tmp_path / "base", family)
    adapter = arch_zoo.make_family_adapter(tmp_path / "adapter", base)
    merged = export(base, tmp_path / "merged.f32.gguf", "gguf", "f32", adapter=adapter)
    seed = export(merged_folder(base, adapter, tmp_path / "merged-hf"), tmp_path / "seed.f32.gguf", "gguf", "f32")
    assert gguf_tensors(merged.out) == gguf_tensors(seed.out)
    architectures = json.loads((base / "config.json").read_text())["architectures"]
    assert merged.details["converter"]["architecture"] == architectures[0]

    base_gguf = export(base, tmp_path / "base.f32.gguf", "gguf", "f32").out
    lora = export(base, tmp_path / "a.lora-f32.gguf", "gguf-lora", "f32", adapter=adapter, base_gguf=base_gguf).out
    expected = peft_logits(base, adapter)
    tolerance = GELU_TABLE_TOLERANCE if family.startswith("gemma") else TOLERANCE
    assert abs(peft_logits(base, None) - expected).max() > 10 * tolerance  # the adapter matters
    with GgufRunner(merged.out, float32_cache=True) as runner:
        assert abs(runner.logits(PROMPT) - expected).max() < tolerance, "merged"
    with GgufRunner(base_gguf, lora=lora, float32_cache=True) as runner:
        assert abs(runner.logits(PROMPT) - expected).max() < tolerance, "adapter-only"


def test_a_gemma3_gguf_base_merges_an_adapter_and_answers_as_peft(tmp_path):
    """From a GGUF base the merge goes through the base's dequantised weights, saved as a folder for the converter:
    with the GGUF's tokenizer, whose tokens Gemma 3's converter counts to drop unused embedding rows."""
    base = arch_zoo.make_family(tmp_path / "base", "gemma3")
    adapter = arch_zoo.make_family_adapter(tmp_path / "adapter", base)
    base_gguf = export(base, tmp_path / "base.f32.gguf", "gguf", "f32").out
    merged = export(base_gguf, tmp_path / "merged.f32.gguf", "gguf", "f32", adapter=adapter)
    with GgufRunner(merged.out, float32_cache=True) as runner:
        assert abs(runner.logits(PROMPT) - peft_logits(base, adapter)).max() < GELU_TABLE_TOLERANCE
