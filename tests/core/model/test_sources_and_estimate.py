"""Base model sources (folder, HF cache, GGUF) and the memory estimate from headers."""

import shutil

import pytest

from lora_studio.core.errors import UserError
from lora_studio.core.model import estimate, sources
from lora_studio.core.system.nvml import GpuReading


def test_folder_and_config_file(tiny_llama):
    assert sources.resolve_source(tiny_llama).kind == "folder"
    assert sources.resolve_source(tiny_llama / "config.json").path == tiny_llama


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "empty folder"),
        (lambda p: (p.write_text("x"), p)[1], "is a file, not a model"),
        (lambda p: (p.with_suffix(".gguf").write_bytes(b"NOPE" * 10), p.with_suffix(".gguf"))[1], "not a GGUF file"),
        (lambda p: (p.mkdir(), (p / "adapter_config.json").write_text("{}"), p)[2], "adapter folder, not a base model"),
    ],
)
def test_bad_sources(tmp_path, make, needle):
    with pytest.raises(UserError, match=needle):
        sources.resolve_source(make(tmp_path / "thing"))


def test_hf_cache_scan_finds_repo(tiny_llama, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama, snap)
    refs = tmp_path / "hub" / "models--acme--tiny" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    found = sources.hf_cache_models()
    assert [s.repo_id for s in found] == ["acme/tiny"]
    assert sources.resolve_source("acme/tiny").path == snap
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        sources.resolve_source("acme/other")


def test_footprint_counts_tied_once(tiny_llama, tiny_llama_tied):
    untied = estimate.read_footprint(sources.resolve_source(tiny_llama))
    tied = estimate.read_footprint(sources.resolve_source(tiny_llama_tied))
    assert untied.params == 39072 and not untied.tied_embeddings
    assert tied.tied_embeddings and tied.params == 39072 - 320 * 32
    assert untied.architecture == "LlamaForCausalLM"


def test_footprint_matches_loaded_model(tiny_llama_tied):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_tied))
    fp = estimate.read_footprint(sources.resolve_source(tiny_llama_tied))
    assert fp.params == sum(p.numel() for p in model.parameters())


def test_estimate_verdicts(tiny_llama_bf16):
    src = sources.resolve_source(tiny_llama_bf16)
    fp = estimate.read_footprint(src)
    assert fp.checkpoint_dtype == "bfloat16"
    big = estimate.ModelFootprint("X", "llama", 7_000_000_000, "bfloat16", True, 14 * 10**9)
    gib = 1024**3
    gpus = [GpuReading(0, "A", 10 * gib, 24 * gib, 0), GpuReading(1, "B", 0, 80 * gib, 0)]
    e = estimate.estimate(src, "bfloat16", "cpu", footprint=big, gpus=gpus, free_ram_bytes=8 * gib)
    assert e.verdict == "does_not_fit" and e.weights_bytes == 14 * 10**9
    e = estimate.estimate(src, "bfloat16", "cuda:1", footprint=big, gpus=gpus, free_ram_bytes=8 * gib)
    assert (e.verdict, e.where) == ("fits", "cuda:1")
    e = estimate.estimate(src, "float32", "cuda:0", footprint=big, gpus=gpus, free_ram_bytes=8 * gib)
    assert e.verdict == "does_not_fit" and "auto" in e.explanation
    e = estimate.estimate(src, "float32", "auto", footprint=big, gpus=gpus[:1], free_ram_bytes=64 * gib)
    assert (e.verdict, e.where) == ("offload", "auto")
    e = estimate.estimate(src, "bfloat16", "auto", footprint=big, gpus=gpus, free_ram_bytes=8 * gib)
    assert (e.verdict, e.where) == ("fits", "cuda:1")
    e = estimate.estimate(src, "float32", "auto", footprint=big, gpus=[], free_ram_bytes=8 * gib)
    assert e.verdict == "does_not_fit" and "no GPU" in e.explanation
    with pytest.raises(UserError):
        estimate.estimate(src, "int3", "cpu", footprint=big, gpus=[], free_ram_bytes=gib)


def test_a_gguf_is_named_by_its_quantisation_not_its_many_small_tensors(tmp_path):
    """general.file_type when the file says it; else the type most bytes use (F32 norms are many, but small)."""
    import gguf
    import numpy as np

    from lora_studio.core.model.estimate import gguf_quantisation

    def write(name: str, file_type=None) -> gguf.GGUFReader:
        writer = gguf.GGUFWriter(str(tmp_path / name), arch="llama")
        if file_type is not None:
            writer.add_file_type(file_type)
        for i in range(5):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, dtype=np.float32))
        writer.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return gguf.GGUFReader(str(tmp_path / name))

    assert gguf_quantisation(write("plain.gguf")) == "F16"
    assert gguf_quantisation(write("typed.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M)) == "Q4_K_M"


def test_adapter_only_ggufs_are_not_listed_as_models(tmp_path, gguf_reads):
    """A folder's adapter-only GGUF (general.type = adapter, as llama.cpp's LoRA converter writes) is served on a
    model, not loaded as one: the local list leaves it out and keeps the model beside it."""
    import gguf
    import numpy as np

    from lora_studio.core.model.sources import is_adapter_gguf, models_in_folders

    def write(name: str, kind: str) -> None:
        writer = gguf.GGUFWriter(str(tmp_path / name), "llama")
        writer.add_type(kind)
        writer.add_tensor("t", np.zeros((2, 2), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write("base.f16.gguf", "model")
    write("mine.lora-f16.gguf", "adapter")
    assert is_adapter_gguf(tmp_path / "mine.lora-f16.gguf") and not is_adapter_gguf(tmp_path / "base.f16.gguf")
    assert [m.label for m in models_in_folders((tmp_path,))] == ["base.f16.gguf"]
    # read once per file as it is: the list's next refresh reads no header, a rewritten file is read again
    gguf_reads.clear()
    assert [m.label for m in models_in_folders((tmp_path,))] == ["base.f16.gguf"] and gguf_reads == []
    write("mine.lora-f16.gguf", "model")
    assert [m.label for m in models_in_folders((tmp_path,))] == ["base.f16.gguf", "mine.lora-f16.gguf"]
    assert gguf_reads == ["mine.lora-f16.gguf"]
