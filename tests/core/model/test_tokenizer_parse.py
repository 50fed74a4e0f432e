"""The step-by-step tokenizer.json parser builds the very tokenizer Tokenizer.from_file builds."""

from __future__ import annotations

import json

import factories
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from lora_studio.core.model import tokenizer_parse
from lora_studio.core.model.loading import load_tokenizer
from lora_studio.core.model.sources import resolve_source

TEXTS = [
    "Hello world <|im_start|>user\nhi<|im_end|>",
    "  odd   spacing\tand\nnewlines",
    "ünïcödé 日本語 😀 <extra> <ctrl7>",
    "",
]


def assert_same_tokenizer(path):
    ref = Tokenizer.from_file(str(path))
    built = tokenizer_parse._build_bpe_in_steps(path)
    assert built is not None, "the stepwise path fell back"
    assert built.to_str() == ref.to_str()
    for text in TEXTS:
        assert built.encode(text).ids == ref.encode(text).ids, text
        assert built.decode(ref.encode(text).ids) == ref.decode(ref.encode(text).ids)


@pytest.fixture
def tokenizer_file(tmp_path):
    """The test models' tokenizer, plus added tokens past the vocabulary: a normal one, then a special one."""
    tok = factories.make_tokenizer().backend_tokenizer
    tok.add_tokens([AddedToken("<extra>", normalized=True)])
    tok.add_special_tokens([AddedToken("<ctrl7>", lstrip=True)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_same_tokenizer_as_from_file(tokenizer_file):
    doc = json.loads(tokenizer_file.read_text())
    assert doc["added_tokens"][-1]["id"] > len(doc["model"]["vocab"])  # ids past the vocabulary are kept
    assert_same_tokenizer(tokenizer_file)


def test_older_merges_written_as_strings(tokenizer_file):
    doc = json.loads(tokenizer_file.read_text())
    doc["model"]["merges"] = [" ".join(pair) for pair in doc["model"]["merges"]]
    tokenizer_file.write_text(json.dumps(doc))
    assert_same_tokenizer(tokenizer_file)


def test_what_it_does_not_know_goes_to_from_file(tmp_path, tokenizer_file):
    word_level = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "word-level.json"
    word_level.save(str(path))
    assert tokenizer_parse._build_bpe_in_steps(path) is None
    assert tokenizer_parse.parse_tokenizer_file(path).to_str() == word_level.to_str()

    doc = json.loads(tokenizer_file.read_text())
    doc["model"]["some_future_option"] = True
    tokenizer_file.write_text(json.dumps(doc))
    assert tokenizer_parse._build_bpe_in_steps(tokenizer_file) is None  # a field it does not pass on: not guessed


def test_load_tokenizer_uses_it_and_puts_transformers_back(tiny_llama, monkeypatch):
    from transformers import AutoTokenizer
    from transformers import tokenization_utils_tokenizers as module

    calls = []
    real = tokenizer_parse._build_bpe_in_steps
    monkeypatch.setattr(tokenizer_parse, "_build_bpe_in_steps", lambda path: calls.append(path) or real(path))
    original = module.TokenizerFast
    ours = load_tokenizer(resolve_source(str(tiny_llama)))
    assert calls and module.TokenizerFast is original
    plain = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert ours.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()
    assert ours("hello <|im_end|>")["input_ids"] == plain("hello <|im_end|>")["input_ids"]
    assert ours.eos_token == plain.eos_token and ours.chat_template == plain.chat_template


@pytest.mark.slow
def test_the_demo_tokenizer():
    from lora_studio.core.demo import model as demo

    source = demo.demo_source_if_available()
    if source is None or not (source.path / "tokenizer.json").is_file():
        pytest.skip("the demo model is not converted on this machine")
    assert_same_tokenizer(source.path / "tokenizer.json")


TRICKY_TOKENS = ['1, "x', "a1,", '"], [', '}, "merges": [', "\\", '\\",', "日本,", " ", ""]


@pytest.mark.parametrize(
    "dump",
    [
        lambda doc: json.dumps(doc),
        lambda doc: json.dumps(doc, indent=2, ensure_ascii=False),
        lambda doc: json.dumps(doc, separators=(",", ":")),
    ],
    ids=["default", "indented-unicode", "compact"],
)
@pytest.mark.parametrize("pairs", [True, False], ids=["pair-merges", "string-merges"])
def test_read_in_pieces_is_json_loads(monkeypatch, dump, pairs):
    # pieces of a few characters: nearly every cut lands inside a string or a pair and must be extended
    monkeypatch.setattr(tokenizer_parse, "PIECE_CHARS", 7)
    vocab = {f"t{i}": i for i in range(300)} | {token: 300 + i for i, token in enumerate(TRICKY_TOKENS)}
    merges = [[a, b] for a, b in zip(TRICKY_TOKENS, reversed(TRICKY_TOKENS), strict=True)] * 20
    doc = {
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": '"vocab": {'}],
        "model": {"type": "BPE", "vocab": vocab, "merges": merges if pairs else [f"{a} {b}" for a, b in merges]},
    }
    text = dump(doc)
    parsed = tokenizer_parse.read_json_in_pieces(text)
    assert parsed == json.loads(text)
    assert list(parsed["model"]["vocab"]) == list(vocab)  # file order kept (ids of duplicates, added tokens)


def test_read_in_pieces_takes_any_json(monkeypatch):
    monkeypatch.setattr(tokenizer_parse, "PIECE_CHARS", 5)
    for text in [
        '{"a": 1}',
        "[1, 2]",
        '{"model": {"vocab": {"a": 1}, "merges": [["a", "b"]]}, "after": 1}',
        '{"model": {"vocab": {"a": 1}, "merges": []}}',
    ]:
        assert tokenizer_parse.read_json_in_pieces(text) == json.loads(text)
    with pytest.raises(ValueError):
        tokenizer_parse.read_json_in_pieces('{"model": {"vocab": {"a": 1,, }, "merges": [["a", "b"]]}}')
