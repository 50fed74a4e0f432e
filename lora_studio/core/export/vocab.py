"""The tokenizer, special tokens and chat template, written into a GGUF as llama.cpp's converter writes them.

Two tokenizer families, as in ``convert_hf_to_gguf.py``:

* byte-level BPE (GPT-2 style: Llama 3, SmolLM, Qwen2, ...): ``tokenizer.ggml.model = "gpt2"``, the token
  list and types from the Hugging Face tokenizer, and the pre-tokenizer named by the same fingerprint
  llama.cpp uses (the hash of a fixed text's token ids), so llama.cpp splits text the same way;
* BPE with byte fallback (Llama 2, Mistral): ``"llama"``, through gguf's ``LlamaHfVocab``.

Merges, BOS/EOS/PAD ids, add-BOS and the chat template come from gguf's ``SpecialVocab``, which
reads only the model folder's own files. A pre-tokenizer llama.cpp would not recognise is refused:
llama.cpp would split text differently and the model would see other tokens than in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.errors import UserError

if TYPE_CHECKING:
    import gguf
    from transformers import PreTrainedTokenizerBase

# llama.cpp's fingerprint text and the fingerprints of the families exported here (from its converter's table)
FINGERPRINT_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天\uff5e "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
# gguf.TokenType values
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4


@dataclass(frozen=True)
class VocabSummary:
    model: str  # "gpt2" or "llama"
    pre: str
    size: int
    chat_template: bool


def tokenizer_json(folder: Path) -> dict:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{Path(folder).name} has no tokenizer.json",
            "GGUF export needs the model's fast tokenizer (tokenizer.json)",
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read: {exc}", "the tokenizer file is damaged") from exc


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase, spec: dict) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE, or a UserError."""
    fingerprint = sha256(str(tokenizer.encode(FINGERPRINT_TEXT)).encode()).hexdigest()
    if fingerprint in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[fingerprint]
    pre = spec.get("pre_tokenizer") or {}
    # a plain byte-level pre-tokenizer with GPT-2's split rule: llama.cpp's "gpt-2"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    raise UserError(
        "llama.cpp would split this tokenizer's text differently: its pre-tokenizer is not one llama.cpp knows "
        f"(fingerprint {fingerprint[:12]}…)",
        "export a merged Hugging Face folder instead; llama.cpp's convert_hf_to_gguf_update.py adds new tokenizers",
    )


def add_vocab(
    writer: gguf.GGUFWriter, folder: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> VocabSummary:
    """Write the tokenizer of the model ``folder`` (``tokenizer`` is the same, loaded)."""
    import gguf

    spec = tokenizer_json(folder)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(
            f"the tokenizer is {model.get('type', 'unknown')}; GGUF export writes BPE tokenizers",
            "export a merged Hugging Face folder and convert it with llama.cpp's converter",
        )
    if model.get("byte_fallback"):
        summary = _add_llama_hf(writer, folder)
        special = gguf.SpecialVocab(folder, n_vocab=summary.size)
    else:
        summary = _add_gpt2(writer, tokenizer, spec, vocab_size)
        special = gguf.SpecialVocab(folder, load_merges=True)
    special.add_to_gguf(writer, quiet=True)
    return replace(summary, chat_template=special.chat_template is not None)


def _add_gpt2(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, spec: dict, vocab_size: int) -> VocabSummary:
    """``get_vocab_base`` of llama.cpp's converter: every id up to the config's vocab size, with its type."""
    pre = pre_tokenizer_name(tokenizer, spec)
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}",
            "the tokenizer does not belong to this model",
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        kind = NORMAL
        if token in added:
            # llama.cpp takes control and user-defined tokens as already normalised
            if not decoder[i].normalized:
                normalised = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
                assert isinstance(normalised, str)  # one sequence of ids decodes to one string
                token = normalised
            if decoder[i].special or _looks_special(token):
                kind = CONTROL
            else:
                token = token.replace("\u2581", " ")
                kind = USER_DEFINED
        tokens.append(token)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return VocabSummary("gpt2", pre, len(tokens), False)


def _looks_special(token: str) -> bool:
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _add_llama_hf(writer: gguf.GGUFWriter, folder: Path) -> VocabSummary:
    import gguf

    vocab = gguf.LlamaHfVocab(Path(folder))
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    return VocabSummary("llama", "default", len(tokens), False)
