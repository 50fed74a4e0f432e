"""Parsing a ``tokenizer.json`` in steps short enough for the window to keep drawing.

``tokenizers.Tokenizer.from_file`` parses the whole file in one Rust call that holds the
GIL: 70 ms for SmolLM2's 3.4 MB file on an idle machine, 110-190 ms on a busy one, and no
Python thread (the GUI thread's repaints included) runs meanwhile. For a BPE tokenizer the
same object can be built in steps that each hold the GIL about half as long: Python's json
parses the file, a tiny Rust call builds the pipeline without its vocabulary, another builds
the BPE model from the parsed vocabulary and merges, and the added tokens are added the way
the Rust deserializer adds them (in file order, special ones with ``add_special_tokens``).
Between the steps the interpreter can hand the GIL to the GUI thread.

The result is the same tokenizer (tests compare ``to_str()`` and encodings with
``from_file``); anything this does not recognise (another model type, an unknown BPE
field, odd merges) falls back to ``from_file``.

:func:`stepwise_tokenizer_parsing` puts this in place of ``Tokenizer.from_file`` inside
transformers' tokenizer module while a tokenizer loads (through ``core/_compat``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.core._compat.tokenizer_swap import tokenizer_files_parsed_by

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

# BPE fields the Python constructor takes, besides vocab and merges (tokenizers 0.2x's serialization)
_BPE_OPTIONS = (
    "dropout",
    "unk_token",
    "continuing_subword_prefix",
    "end_of_word_suffix",
    "fuse_unk",
    "byte_fallback",
    "ignore_merges",
)
_ADDED_TOKEN_FIELDS = {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"}


def parse_tokenizer_file(path: str | Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to ``Tokenizer.from_file(path)``, built in short steps where possible."""
    from tokenizers import Tokenizer

    try:
        built = _build_bpe_in_steps(Path(path))
    except Exception:  # noqa: BLE001 - whatever this path trips on, the library's own parser decides
        built = None
    return built if built is not None else Tokenizer.from_file(str(path))


def _build_bpe_in_steps(path: Path) -> Tokenizer | None:
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    try:
        doc = read_json_in_pieces(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # let from_file raise its own error
    if not isinstance(doc, dict) or doc.get("version") != "1.0":
        return None
    model = doc.get("model")
    if (
        not isinstance(model, dict)
        or model.get("type") != "BPE"
        or set(model) - {"type", "vocab", "merges", *_BPE_OPTIONS}
    ):
        return None
    vocab, merges, added = model.get("vocab"), model.get("merges"), doc.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
        return None
    pairs = _merge_pairs(merges)
    if pairs is None or not all(
        isinstance(t, dict) and set(t) <= _ADDED_TOKEN_FIELDS and isinstance(t.get("content"), str) for t in added
    ):
        return None
    skeleton = dict(doc, added_tokens=[], model={"type": "BPE", "vocab": {}, "merges": []})
    tokenizer = Tokenizer.from_str(json.dumps(skeleton))  # everything but the vocabulary: a few kB
    options = {k: model[k] for k in _BPE_OPTIONS if model.get(k) is not None}  # None is the default, and not accepted
    tokenizer.model = BPE(vocab=vocab, merges=pairs, **options)  # the one long step (~half of from_file)
    # as the deserializer does: each token in file order, special ones as special tokens; runs of one kind
    # go in one call (the same ids: each token is looked up, or numbered, in turn)
    run: list[AddedToken] = []
    for entry in added:
        token = AddedToken(
            entry["content"],
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", True),
            special=entry.get("special", False),
        )
        if run and run[-1].special != token.special:
            _add(tokenizer, run)
            run = []
        run.append(token)
    if run:
        _add(tokenizer, run)
    for entry in added:  # the file's ids must come out the same, or this is not the file's tokenizer
        if "id" in entry and tokenizer.token_to_id(entry["content"]) != entry["id"]:
            return None
    return tokenizer


# The vocabulary and the merges are nearly all of a tokenizer.json; json.loads of SmolLM2's whole file is one
# ~30 ms C call. Read in pieces of this many characters (~1.5 ms each), the GUI thread gets the GIL in between.
PIECE_CHARS = 1 << 17
_VOCAB_OPEN = re.compile(r'"vocab"\s*:\s*\{')
_MERGES_OPEN = re.compile(r'\}\s*,\s*"merges"\s*:\s*\[')
_MERGES_CLOSE = re.compile(r"\]\s*\}\s*\}\s*$")
# where a piece may end: after an entry ("key": 123 / ["a", "b"] / "a b"), before the comma that follows it
_VOCAB_CUT = re.compile(r"\d\s*,")
_PAIR_CUT = re.compile(r"\]\s*,")
_STRING_CUT = re.compile(r'"\s*,')
_STARTS_WITH_PAIR = re.compile(r"\s*\[")


def read_json_in_pieces(text: str) -> Any:
    """``json.loads(text)`` for a tokenizer.json, its vocabulary and merges parsed a piece at a time.

    The pieces are cut at the commas between entries. A cut that lands inside a string (a token may hold
    any characters) leaves that string unterminated, so the piece does not parse and is extended to the
    next comma; what does parse is exactly the entries between two separators. The document around the
    two bodies is parsed on its own and must come out with an empty vocabulary and empty merges, or the
    spans were not what they seemed; anything unexpected is one plain ``json.loads``.
    """
    vocab_open = _VOCAB_OPEN.search(text)
    merges_open = _MERGES_OPEN.search(text, vocab_open.end()) if vocab_open else None
    merges_close = _MERGES_CLOSE.search(text, merges_open.end()) if merges_open else None
    if vocab_open is None or merges_open is None or merges_close is None:
        return json.loads(text)
    vocab_body = (vocab_open.end(), merges_open.start())
    merges_body = (merges_open.end(), merges_close.start())
    doc = json.loads(text[: vocab_body[0]] + text[vocab_body[1] : merges_body[0]] + text[merges_body[1] :])
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("vocab") != {} or model.get("merges") != []:
        return json.loads(text)
    vocab: dict = {}
    for piece in _pieces(text, *vocab_body, _VOCAB_CUT, "{", "}"):
        vocab.update(piece)
    merges: list = []
    pairs = _STARTS_WITH_PAIR.match(text, merges_body[0]) is not None  # [["a", "b"], ...] or older ["a b", ...]
    for piece in _pieces(text, *merges_body, _PAIR_CUT if pairs else _STRING_CUT, "[", "]"):
        merges.extend(piece)
    model["vocab"], model["merges"] = vocab, merges
    return doc


def _pieces(text: str, start: int, end: int, cut: re.Pattern[str], left: str, right: str) -> Iterator[Any]:
    """The parsed pieces of the JSON object/array body ``text[start:end]``, each about PIECE_CHARS long."""
    while start < end:
        at = start + PIECE_CHARS
        while True:
            found = cut.search(text, at, end) if at < end else None
            stop = found.end() - 1 if found else end  # the comma (excluded), or the end of the body
            try:
                yield json.loads(left + text[start:stop] + right)
                break
            except ValueError:
                if found is None:
                    raise
                at = found.end()  # cut inside a string: try the next comma
        start = stop + 1


def _add(tokenizer: Tokenizer, tokens: list[AddedToken]) -> None:
    if tokens[0].special:
        tokenizer.add_special_tokens(tokens)
    else:
        tokenizer.add_tokens(tokens)


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]] | None:
    """Merges as (left, right) tuples: the file holds pairs, or (older files) "left right" strings."""
    pairs: list[tuple[str, str]] = []
    for m in merges:
        if isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], str):
            pairs.append((m[0], m[1]))
        elif isinstance(m, str) and m.count(" ") == 1:
            left, right = m.split(" ")
            pairs.append((left, right))
        else:
            return None
    return pairs


@contextmanager
def stepwise_tokenizer_parsing() -> Iterator[None]:
    """While inside, transformers on this thread parses a tokenizer.json with :func:`parse_tokenizer_file`.

    The swap itself is a hook of :mod:`lora_studio.core._compat.tokenizer_swap`; where it does not apply,
    transformers parses the file itself.
    """
    with tokenizer_files_parsed_by(parse_tokenizer_file):
        yield
