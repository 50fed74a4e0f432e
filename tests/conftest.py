"""Shared fixtures: tiny real models and adapters, built once per test session.

The models are random Llama / GPT-2 configs (tens of KB) saved as real
safetensors folders with a real tokenizer; adapters are made with PEFT's own
get_peft_model(init_lora_weights=False), so they change outputs.
"""

from __future__ import annotations

import os
import tempfile
import threading

import factories
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process CLI runs open the log file: keep it out of the user's data folder.
os.environ.setdefault("LORA_STUDIO_LOG_DIR", tempfile.mkdtemp(prefix="lora-studio-test-logs-"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(models_dir):
    """A random 2-layer Llama (float32), untied embeddings."""
    return factories.make_llama(models_dir / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_tied(models_dir):
    return factories.make_llama(models_dir / "tiny-llama-tied", tie_word_embeddings=True, seed=3)


@pytest.fixture(scope="session")
def tiny_llama_bf16(models_dir):
    return factories.make_llama(models_dir / "tiny-llama-bf16", dtype="bfloat16", seed=4)


@pytest.fixture(scope="session")
def tiny_llama_wide(models_dir):
    """Same architecture, another hidden size: adapters for it do not fit tiny_llama."""
    return factories.make_llama(models_dir / "tiny-llama-wide", hidden_size=64, seed=5)


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir):
    return factories.make_gpt2(models_dir / "tiny-gpt2")


def two_adapters(base, folder, prefix: str = "adapter") -> dict:
    """Two adapters for ``base`` with different targets and seeds: {'alpha': path, 'beta': path}."""
    return {
        "alpha": factories.make_adapter(base, folder / f"{prefix}-alpha", seed=11),
        "beta": factories.make_adapter(
            base,
            folder / f"{prefix}-beta",
            seed=12,
            r=8,
            lora_alpha=16,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
    }


@pytest.fixture(scope="session")
def llama_adapters(models_dir, tiny_llama):
    """Two adapters for tiny_llama with different targets and seeds: {'alpha': path, 'beta': path}."""
    return two_adapters(tiny_llama, models_dir)


@pytest.fixture(scope="session")
def gguf_llama(models_dir):
    """A random 2-layer Llama (float32, untied) with the demo's SmolLM2 tokenizer: one llama.cpp's converter takes
    (it refuses a tokenizer whose pre-tokenizer it does not know, like the toy one of tiny_llama)."""
    import arch_zoo

    return arch_zoo.make_family(models_dir / "gguf-llama", "llama", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def gguf_llama_adapters(models_dir, gguf_llama):
    """Two adapters for gguf_llama, as llama_adapters: {'alpha': path, 'beta': path}."""
    return two_adapters(gguf_llama, models_dir, "gguf-adapter")


@pytest.fixture(scope="session")
def wide_adapter(models_dir, tiny_llama_wide):
    return factories.make_adapter(tiny_llama_wide, models_dir / "adapter-wide", seed=13)


@pytest.fixture(scope="session")
def gpt2_adapter(models_dir, tiny_gpt2):
    return factories.make_adapter(
        tiny_gpt2, models_dir / "adapter-gpt2", target_modules=("c_attn",), fan_in_fan_out=True, seed=14
    )


@pytest.fixture
def gguf_reads(monkeypatch) -> list[str]:
    """The names of the GGUF files gguf's reader parses during the test, one entry a read (LoRA Studio's own reads
    and transformers', with or without the compat hook: the count is taken where the reader parses the metadata)."""
    from pathlib import Path

    import gguf

    reads: list[str] = []
    build_fields = gguf.GGUFReader._build_fields  # once a read, after the file is mapped

    def counted(self, *args, **kwargs):
        reads.append(Path(self.data.filename).name)
        return build_fields(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "_build_fields", counted)
    return reads


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A private LORA_STUDIO_DATA_DIR for tests that write app data."""
    path = tmp_path / "data"
    monkeypatch.setenv("LORA_STUDIO_DATA_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def no_leftover_threads():
    """Fail a test that leaves non-daemon threads running (napari does the same)."""
    before = set(threading.enumerate())
    yield
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leftover:
        t.join(timeout=5)
    still = [t.name for t in leftover if t.is_alive()]
    assert not still, f"test left threads running: {still}"


@pytest.fixture(scope="session")
def added_tokens_adapter(models_dir):
    """An adapter trained on a vocabulary with 10 added tokens, with its tokenizer.

    embed_tokens/lm_head are in modules_to_save.
    """
    bigger = factories.make_llama(models_dir / "trap-big-vocab", vocab_size=330)
    adapter = factories.make_adapter(
        bigger, models_dir / "trap-added-tokens", modules_to_save=["lm_head", "embed_tokens"], seed=31
    )
    tok = factories.make_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(10)])
    tok.save_pretrained(str(adapter))
    return adapter


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP waits dominate.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
