"""A model's chat template, run safely: its failures as one line, and a time limit.

Chat templates come with the model folder (tokenizer_config.json or chat_template.jinja): untrusted text.
transformers renders them in Jinja's immutable sandbox, so no code runs, but a template can still fail (it
reaches for ``__class__``, calls ``raise_exception``, uses a filter Jinja lacks) or loop for hours (nested
``range`` loops). Every use of a template in the core goes through :func:`apply_chat_template`: a Jinja error
becomes a :class:`UserError` naming the template's problem, and rendering is stopped after
``TEMPLATE_SECONDS`` by a trace function on the calling thread that watches only the compiled template's frames.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from lora_studio.core.errors import UserError

TEMPLATE_SECONDS = 5.0  # far above any real template (they render in milliseconds)
_FIX = "fix the chat template (tokenizer_config.json or chat_template.jinja), or turn the chat template off"


class _TemplateTimeout(Exception):
    pass


def apply_chat_template(tokenizer: Any, messages: Sequence[dict[str, str]], **kwargs: Any) -> Any:
    """``tokenizer.apply_chat_template(messages, **kwargs)``; a failing or endless template is one clear line."""
    import jinja2

    deadline = time.monotonic() + TEMPLATE_SECONDS

    def in_template(frame: Any, event: str, _arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _TemplateTimeout()
        return in_template

    def on_call(frame: Any, _event: str, _arg: Any) -> Any:
        # Jinja compiles a template to Python code whose file name is "<template>": trace only those frames
        if frame.f_code.co_filename.startswith("<"):
            return in_template
        return None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return tokenizer.apply_chat_template(list(messages), **kwargs)
    except _TemplateTimeout:
        raise UserError(f"the chat template ran for more than {TEMPLATE_SECONDS:g} s and was stopped", _FIX) from None
    except jinja2.exceptions.SecurityError as exc:
        raise UserError(f"the chat template tried something the sandbox forbids ({exc})", _FIX) from None
    except jinja2.TemplateError as exc:
        # raise_exception() in the template, a syntax error, an unknown filter or test, an undefined value
        raise UserError(f"the chat template failed: {' '.join(str(exc).split())[:200]}", _FIX) from None
    except RecursionError:
        raise UserError("the chat template recursed without end", _FIX) from None
    except (OverflowError, MemoryError) as exc:  # the sandbox refuses a range of hundreds of millions this way
        raise UserError(f"the chat template asked for too much ({type(exc).__name__}: {exc})", _FIX) from None
    finally:
        sys.settrace(previous)


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    """The token ids of ``messages`` through the chat template."""
    ids: Any = apply_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]
