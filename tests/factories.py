"""Tiny real models, tokenizers and LoRA adapters for tests and benchmarks.

Everything is built locally from random weights (no hub): a byte-level BPE
tokenizer trained on a few sentences, Llama and GPT-2 configs a few MB big, and
adapters made with PEFT's own ``get_peft_model`` with ``init_lora_weights=False``
so that they really change the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adapters add low rank updates to frozen weights.",
    "Merging an adapter folds B times A into the base weight.",
    "Arr, the pirate sails the seven seas with a parrot.",
    "- one\n- two\n- three",
    "What is the capital of France? Paris is the capital.",
    "user assistant system hello world 0123456789",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 320


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def qwen2_config(**overrides):
    """The tiny Llama's shape as a Qwen2 (q/k/v biases, no rotary permutation in GGUF)."""
    from transformers import Qwen2Config

    kw = llama_config().to_dict()
    kw = {
        k: kw[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        )
    }
    kw.update(overrides)
    return Qwen2Config(**kw)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = dict(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def opt_config(**overrides):
    """OPT: its MLP flattens batch and time before fc1/fc2 (what PEFT's mixed batches cannot follow)."""
    from transformers import OPTConfig

    kw = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        word_embed_proj_dim=16,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return OPTConfig(**kw)


def save_model(folder: Path, config, *, dtype: str = "float32", seed: int = 0, tokenizer=None) -> Path:
    """Build a random causal LM from ``config`` and save it (safetensors, tokenizer, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    model.eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    (tokenizer or make_tokenizer()).save_pretrained(folder)
    return folder


def make_llama(folder: Path, **kw) -> Path:
    dtype = kw.pop("dtype", "float32")
    seed = kw.pop("seed", 0)
    return save_model(folder, llama_config(**kw), dtype=dtype, seed=seed)


def make_qwen2(folder: Path, **kw) -> Path:
    dtype = kw.pop("dtype", "float32")
    seed = kw.pop("seed", 0)
    return save_model(folder, qwen2_config(**kw), dtype=dtype, seed=seed)


def make_gpt2(folder: Path, **kw) -> Path:
    dtype = kw.pop("dtype", "float32")
    seed = kw.pop("seed", 0)
    return save_model(folder, gpt2_config(**kw), dtype=dtype, seed=seed)


def make_adapter(
    base: Path,
    folder: Path,
    *,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules=("q_proj", "v_proj"),
    seed: int = 1,
    dtype: str = "float32",
    scale: float = 1.0,
    **lora_kwargs,
) -> Path:
    """A LoRA adapter for ``base`` with random (non-zero) A and B, saved with PEFT's save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
    peft_model.save_pretrained(str(folder))
    return Path(folder)


def edit_adapter_config(folder: Path, **changes) -> None:
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def peft_model(base: Path, adapters: dict, dtype: str = "float32", active: str | None = None):
    """The reference: a PeftModel with ``adapters`` (name -> folder) loaded by PEFT directly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    items = list(adapters.items())
    pm = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        pm.load_adapter(str(path), adapter_name=name)
    if active:
        pm.set_adapter(active)
    pm.eval()
    return pm


def alpha_beta_session(base: Path, adapters: dict):
    """A Session with ``base`` loaded and the conftest adapters "alpha" and "beta" attached, alpha active."""
    from lora_studio.core.model.sources import resolve_source
    from lora_studio.core.session import Session

    session = Session()
    session.load(resolve_source(base))
    session.attach(adapters["alpha"], "alpha")
    session.attach(adapters["beta"], "beta")
    session.activate("alpha")
    return session


def save_quantised(base: Path, folder: Path, kind: str = "nf4") -> Path:
    """``base`` quantised by transformers + bitsandbytes and saved so (a checkpoint saved in 4 bits), with its
    tokenizer files."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lora_studio.core.model.quantize import quantization_config

    AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=quantization_config(kind, "float32"), device_map={"": "cpu"}
    ).save_pretrained(folder)
    for file in Path(base).iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)
    return folder
