"""A tokenizer.json parsed by LoRA Studio's own parser while transformers loads a tokenizer.

transformers' tokenizer module builds its ``tokenizers.Tokenizer`` through the module-level name
``TokenizerFast`` (``from tokenizers import Tokenizer as TokenizerFast``): ``from_file`` to parse a
tokenizer.json, ``from_str``, the constructor, and ``isinstance``/annotations.
:func:`tokenizer_files_parsed_by` swaps that name, for the calling thread and the duration of one load,
for a stand-in whose ``from_file`` is the given parser (``lora_studio.core.model.tokenizer_parse``) and
whose every other use is ``tokenizers.Tokenizer``'s own. If transformers moved that module, renamed the
name or bound it to something else, the tokenizer loads through plain ``AutoTokenizer`` (with a warning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import code_uses_name, import_target, original_of, swapped, warn_inactive

HOOK = "tokenizer parsing"
MODULE = "transformers.tokenization_utils_tokenizers"
ATTRIBUTE = "TokenizerFast"


class _ParsingTokenizerClass:
    """Stands in for ``tokenizers.Tokenizer``: ``from_file(path)`` is the given parser, the rest is the class's own."""

    def __init__(self, parse_file: Callable[[Any], Any]) -> None:
        self._parse_file = parse_file

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer(*args, **kwargs)

    def from_file(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        from tokenizers import Tokenizer

        return self._parse_file(path) if not args and not kwargs else Tokenizer.from_file(path, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # from_str, from_buffer, ... and class attributes
        from tokenizers import Tokenizer

        return getattr(Tokenizer, name)

    def __instancecheck__(self, obj: Any) -> bool:
        from tokenizers import Tokenizer

        return isinstance(obj, Tokenizer)


def _inactive_reason() -> tuple[Any, str]:
    module, reason = import_target(MODULE)
    if module is None:
        return None, reason
    if not hasattr(module, ATTRIBUTE):
        return None, f"{MODULE} has no {ATTRIBUTE!r} any more"
    from tokenizers import Tokenizer

    if original_of(getattr(module, ATTRIBUTE)) is not Tokenizer:
        return None, f"{MODULE}.{ATTRIBUTE} is no longer tokenizers.Tokenizer"
    if not code_uses_name(module, ATTRIBUTE) or not code_uses_name(module, "from_file"):
        return None, f"{MODULE} no longer parses tokenizer files through {ATTRIBUTE}.from_file"
    return module, ""


def checks() -> dict[str, str]:
    return {f"{MODULE}.{ATTRIBUTE}": _inactive_reason()[1] or ACTIVE}


@contextmanager
def tokenizer_files_parsed_by(parse_file: Callable[[Any], Any]) -> Iterator[None]:
    """While inside, transformers on this thread parses a tokenizer.json with ``parse_file(path)``."""
    module, reason = _inactive_reason()
    if module is None:
        warn_inactive(HOOK, reason)
        yield
        return
    with swapped(module, ATTRIBUTE, _ParsingTokenizerClass(parse_file)):
        yield
