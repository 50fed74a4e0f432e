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
transformers' tokenizer module while a tokenizer loads.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

# BPE fields the Python constructor takes, besides vocab and merges (tokenizers 0.2x's serialization)
_BPE_OPTIONS = ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback",
                "ignore_merges")
_ADDED_TOKEN_FIELDS = {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"}


def parse_tokenizer_file(path) -> object:
    """A ``tokenizers.Tokenizer`` equal to ``Tokenizer.from_file(path)``, built in short steps where possible."""
    from tokenizers import Tokenizer

    try:
        built = _build_bpe_in_steps(Path(path))
    except Exception:  # noqa: BLE001 - whatever this path trips on, the library's own parser decides
        built = None
    return built if built is not None else Tokenizer.from_file(str(path))


def _build_bpe_in_steps(path: Path):
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    try:
        doc = json.loads(path.read_text("utf-8"))  # ~30 ms for SmolLM2's file (splitting it gains little)
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # let from_file raise its own error
    if not isinstance(doc, dict) or doc.get("version") != "1.0":
        return None
    model = doc.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or set(model) - {"type", "vocab", "merges", *_BPE_OPTIONS}:
        return None
    vocab, merges, added = model.get("vocab"), model.get("merges"), doc.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
        return None
    pairs = _merge_pairs(merges)
    if pairs is None or not all(isinstance(t, dict) and set(t) <= _ADDED_TOKEN_FIELDS and isinstance(t.get("content"), str)
                                for t in added):
        return None
    skeleton = dict(doc, added_tokens=[], model={"type": "BPE", "vocab": {}, "merges": []})
    tokenizer = Tokenizer.from_str(json.dumps(skeleton))  # everything but the vocabulary: a few kB
    options = {k: model[k] for k in _BPE_OPTIONS if model.get(k) is not None}  # None is the default, and not accepted
    tokenizer.model = BPE(vocab=vocab, merges=pairs, **options)  # the one long step (~half of from_file)
    # as the deserializer does: each token in file order, special ones as special tokens; runs of one kind
    # go in one call (the same ids: each token is looked up, or numbered, in turn)
    run: list = []
    for entry in added:
        token = AddedToken(entry["content"], single_word=entry.get("single_word", False), lstrip=entry.get("lstrip", False),
                           rstrip=entry.get("rstrip", False), normalized=entry.get("normalized", True),
                           special=entry.get("special", False))
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


def _add(tokenizer, tokens: list) -> None:
    if tokens[0].special:
        tokenizer.add_special_tokens(tokens)
    else:
        tokenizer.add_tokens(tokens)


def _merge_pairs(merges: list):
    """Merges as (left, right) tuples: the file holds pairs, or (older files) "left right" strings."""
    pairs = []
    for m in merges:
        if isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], str):
            pairs.append((m[0], m[1]))
        elif isinstance(m, str) and m.count(" ") == 1:
            left, right = m.split(" ")
            pairs.append((left, right))
        else:
            return None
    return pairs


class _TokenizerClass:
    """Stands in for ``tokenizers.Tokenizer`` in transformers' tokenizer module: ``from_file`` parses in steps.

    transformers uses that name to build (``TokenizerFast(model)``), to parse (``from_file``,
    ``from_str``) and in annotations; the first two give real ``tokenizers.Tokenizer`` objects.
    """

    def __new__(cls, *args, **kwargs):
        from tokenizers import Tokenizer

        return Tokenizer(*args, **kwargs)

    @staticmethod
    def from_file(path, *args, **kwargs):
        from tokenizers import Tokenizer

        return parse_tokenizer_file(path) if not args and not kwargs else Tokenizer.from_file(path, *args, **kwargs)

    @staticmethod
    def from_str(text, *args, **kwargs):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(text, *args, **kwargs)


_patch_lock = threading.Lock()
_patch_users = 0
_original = None


@contextmanager
def stepwise_tokenizer_parsing():
    """While inside, transformers builds tokenizers from tokenizer.json with :func:`parse_tokenizer_file`.

    Counted, so overlapping loads on several threads put the original back only when the last one ends.
    """
    global _patch_users, _original
    from transformers import tokenization_utils_tokenizers as module

    with _patch_lock:
        if _patch_users == 0:
            _original = module.TokenizerFast
            module.TokenizerFast = _TokenizerClass
        _patch_users += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                module.TokenizerFast = _original
