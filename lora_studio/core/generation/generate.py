"""Generating text from the session's model: one prompt, one variant, streamed token by token.

Batched multi-variant comparison builds on the same input preparation and
settings (see the comparison module); this module is the plain single run used by
the window's quick test box and by verification.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.generation.chat_template import chat_ids
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch
    from peft import PeftModelForCausalLM
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    # What generates: a transformers causal LM, or the PeftModel wrapping one (a session's model). A causal LM's
    # class mixes GenerationMixin into PreTrainedModel; the static type does not show it (see the generate calls).
    CausalLM = PreTrainedModel | PeftModelForCausalLM

MAX_NEW_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False  # greedy by default: deterministic, fair comparisons
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    use_chat_template: bool = True

    def to_json(self) -> dict:
        return asdict(self)


MAX_TEMPERATURE = 100.0  # far above any useful one (2 is already noise); inf would divide the logits to nothing


def validate(settings: GenerationSettings, prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty", "type a prompt first")
    if settings.max_new_tokens < 1:
        raise UserError(f"max new tokens is {settings.max_new_tokens}", "ask for at least 1 new token")
    if settings.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise UserError(f"max new tokens is {settings.max_new_tokens:,}", f"ask for at most {MAX_NEW_TOKENS_LIMIT:,}")
    if settings.do_sample and not (0 < settings.temperature <= MAX_TEMPERATURE and 0 < settings.top_p <= 1):
        raise UserError(
            f"sampling needs a temperature above 0 and at most {MAX_TEMPERATURE:g}, and 0 < top-p ≤ 1",
            "fix the decoding settings",
        )
    if not 0 <= settings.seed < 2**63:  # torch.manual_seed's range
        raise UserError(f"seed {settings.seed} must be a whole number from 0 to {2**63 - 1}", "e.g. 0")


def check_text(prompt: str) -> None:
    """A prompt must be text the tokenizer can encode: invalid UTF-8 read from argv or a file arrives as lone
    surrogates, which the tokenizer rejects with an internal error."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"the prompt is not valid text: character {exc.start + 1} is invalid UTF-8 or a lone surrogate",
            "give the prompt as UTF-8 text",
        ) from exc


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    check_text(prompt)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def eos_ids(model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def context_limit(model: CausalLM) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class _StopOnCancel:
    """A transformers StoppingCriteria that ends generation within one decoding step of a cancel."""

    def __init__(self, cancel: CancelToken) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch

        return torch.full((input_ids.shape[0],), self.cancel.cancelled, dtype=torch.bool, device=input_ids.device)


class _TokenCallbackStreamer:
    """Receives each new token id from ``generate`` (on the generating thread)."""

    def __init__(self, prompt_len: int, on_token: Callable[[int], None]) -> None:
        self._skip_prompt = True
        self._on_token = on_token

    def put(self, value: torch.Tensor) -> None:
        if self._skip_prompt:
            self._skip_prompt = False  # the first call carries the prompt
            return
        for tok in value.reshape(-1).tolist():
            self._on_token(int(tok))

    def end(self) -> None:
        pass


def generation_kwargs(
    settings: GenerationSettings, model: CausalLM, tokenizer: PreTrainedTokenizerBase, cancel: CancelToken
) -> dict:
    from transformers import StoppingCriteriaList

    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        stopping_criteria=StoppingCriteriaList([_StopOnCancel(cancel)]),
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else (eos_ids(model, tokenizer) or [0])[0],
        eos_token_id=eos_ids(model, tokenizer) or None,
    )
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


class TextStream:
    """Turns a stream of token ids into printable text deltas, holding back incomplete UTF-8.

    ``push`` returns the text a new token adds ("" while a multi-byte character is incomplete); once the
    stream has ended, ``flush`` returns what is still held back, so the deltas add up to the decoded text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._line_start = 0  # decode from here (the start of the current line) to keep decoding cheap
        self._printed = 0
        self._emitted: list[str] = []

    def push(self, tok: int) -> str:
        self._tokens.append(tok)
        text = self._decode(self._tokens[self._line_start :])
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._printed :]
        if text.endswith("\n"):
            self._line_start, self._printed = len(self._tokens), 0
        else:
            self._printed = len(text)
        self._emitted.append(delta)
        return delta

    def flush(self) -> str:
        """What is still held back once the stream has ended."""
        full = self._decode(self._tokens)
        emitted = "".join(self._emitted)
        rest = full[len(emitted) :] if full.startswith(emitted) else ""
        self._emitted.append(rest)
        return rest

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text


@dataclass(frozen=True)
class Generated:
    text: str
    token_ids: list[int]
    prompt_token_count: int


def generate(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    settings: GenerationSettings = GenerationSettings(),
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    on_token: Callable[[int], None] | None = None,
    on_text: Callable[[str, int], None] | None = None,
) -> Generated:
    """Generate a continuation; ``on_token`` sees each new token id as it is produced.

    ``on_text(delta, tokens)`` sees the printable text each new token adds (with how many tokens it covers),
    on the generating thread: the deltas add up to the result's text (a front end streams them). A cancel
    stops within one decoding step and raises Cancelled; what was streamed until then stays streamed.
    """
    import torch

    cancel = cancel or CancelToken()
    validate(settings, prompt)
    ids = prompt_ids(tokenizer, prompt, settings.use_chat_template)
    limit = context_limit(model)
    if limit and len(ids) + settings.max_new_tokens > limit:
        raise UserError(
            f"prompt ({len(ids)} tokens) plus {settings.max_new_tokens} new tokens "
            f"exceeds the model's context of {limit}",
            "shorten the prompt or ask for fewer tokens",
        )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    produced: list[int] = []
    stream = TextStream(tokenizer) if on_text is not None else None
    held = [0]  # tokens whose text is still held back (an incomplete character)

    def on_new(tok: int) -> None:
        produced.append(tok)
        report(Progress(len(produced), settings.max_new_tokens, "generating", "tokens"))
        if on_token is not None:
            on_token(tok)
        if stream is not None and on_text is not None:
            delta = stream.push(tok)
            held[0] += 1
            if delta:
                on_text(delta, held[0])
                held[0] = 0

    if settings.do_sample:
        torch.manual_seed(settings.seed)
    with torch.inference_mode():
        # PreTrainedModel's type lacks the GenerationMixin a causal LM's class adds
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=_TokenCallbackStreamer(len(ids), on_new),
            **generation_kwargs(settings, model, tokenizer, cancel),
        )
    if stream is not None and on_text is not None:
        rest = stream.flush()
        if rest or held[0]:
            on_text(rest, held[0])
    if cancel.cancelled:
        raise Cancelled()
    new = [int(t) for t in out[0, len(ids) :].tolist()]
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence of ids decodes to one string
    return Generated(text, new, len(ids))


# -- batches: several rows in one ``generate`` (used by the comparison) ---------------------------------------------

# Rows at or below this count decode with the weight-streaming matmul below (see _small_batch_linears).
_SMALL_BATCH_ROWS = 16


class _BatchStreamer:
    """Receives each decoding step's new token per row (on the generating thread).

    ``on_step`` gets one entry per row: the new token id, or None for a row that
    already ended (generate keeps padding finished rows until every row ends).
    """

    def __init__(self, rows: int, eos: list[int], on_step: Callable[[list[int | None]], None]) -> None:
        self._skip_prompt = True
        self._eos = set(eos)
        self._finished = [False] * rows
        self._on_step = on_step

    def put(self, value: torch.Tensor) -> None:
        if self._skip_prompt:
            self._skip_prompt = False  # the first call carries the prompts
            return
        step: list[int | None] = []
        for row, tok in enumerate(value.reshape(-1).tolist()):
            if self._finished[row]:
                step.append(None)
                continue
            step.append(int(tok))
            if tok in self._eos:
                self._finished[row] = True
        self._on_step(step)

    def end(self) -> None:
        pass


def _small_batch_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    import torch

    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 1 < rows <= _SMALL_BATCH_ROWS:
        # W @ xᵀ streams the weight once for all rows; x @ Wᵀ (F.linear) makes MKL walk it once per row
        # at 2-3 rows, which makes a 3-row decoding step cost ~3 single-row steps on CPU.
        out = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t()
        if module.bias is not None:
            out = out + module.bias
        return out.reshape(*x.shape[:-1], module.weight.shape[0])
    return torch.nn.functional.linear(x, module.weight, module.bias)


class _small_batch_linears:
    """While active, plain ``nn.Linear`` layers of a CPU model compute small batches as W @ xᵀ.

    Only exact ``nn.Linear`` instances on the CPU, without an instance-level forward already
    (accelerate's offload hooks install one), are touched; single rows keep F.linear, so a
    one-row run is bit-for-bit what it is without this. Restored on exit.
    """

    def __init__(self, model: CausalLM) -> None:
        self._model = model
        self._patched: list[torch.nn.Linear] = []

    def __enter__(self) -> _small_batch_linears:
        import functools

        import torch

        for module in self._model.modules():
            if (
                type(module) is torch.nn.Linear
                and "forward" not in module.__dict__
                and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.float32
            ):
                # an instance attribute, as ``module.forward = ...`` sets it (and as __exit__ removes it)
                module.__dict__["forward"] = functools.partial(_small_batch_linear, module)
                self._patched.append(module)
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()


def pad_token_id(model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return (eos_ids(model, tokenizer) or [0])[0]


def check_context(model: CausalLM, prompt_len: int, settings: GenerationSettings) -> None:
    limit = context_limit(model)
    if limit and prompt_len + settings.max_new_tokens > limit:
        raise UserError(
            f"prompt ({prompt_len} tokens) plus {settings.max_new_tokens} new tokens "
            f"exceeds the model's context of {limit}",
            "shorten the prompt or ask for fewer tokens",
        )


def generate_rows(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[list[int]],
    settings: GenerationSettings,
    *,
    cancel: CancelToken | None = None,
    on_step: Callable[[list[int | None]], None] | None = None,
    model_kwargs: dict | None = None,
) -> list[list[int]]:
    """New token ids for each row of prompt ids, all rows in one ``generate``.

    Rows of different lengths are left-padded with an attention mask (generate
    derives position ids from the mask), so a row continues exactly as it would
    alone. Each returned row ends at (and includes) its first EOS. ``model_kwargs``
    go to ``generate`` (PEFT's ``adapter_names``). Raises Cancelled after a cancel,
    within one decoding step. Sampling seeds torch's global generator with
    ``settings.seed`` once for the whole batch.
    """
    import torch

    cancel = cancel or CancelToken()
    if not rows:
        return []
    for ids in rows:
        check_context(model, len(ids), settings)
    device = next(model.parameters()).device
    width = max(len(ids) for ids in rows)
    pad = pad_token_id(model, tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
    eos = eos_ids(model, tokenizer)
    streamer = _BatchStreamer(len(rows), eos, on_step or (lambda step: None))
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    kwargs = generation_kwargs(settings, model, tokenizer, cancel)
    kwargs.update(model_kwargs or {})
    # One row keeps the stock path, so it is bit-for-bit what ``generate`` gives.
    with torch.inference_mode(), _small_batch_linears(model) if len(rows) > 1 else contextlib.nullcontext():
        # PreTrainedModel's type lacks the GenerationMixin a causal LM's class adds
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=attention_mask, streamer=streamer, **kwargs
        )
    if cancel.cancelled:
        raise Cancelled()
    result = []
    eos_set = set(eos)
    for row in out[:, width:].tolist():
        new: list[int] = []
        for tok in row:
            new.append(int(tok))
            if tok in eos_set:
                break
        result.append(new)
    return result
