"""Side-by-side comparison: N variants of the session's model on the same prompt(s).

A *variant* (core/compare/variants.py) is the base (adapters disabled), an attached
adapter, a weighted combination registered on the session
(:meth:`Session.register_combination`, an adapter like any other), or a merged model
folder loaded read-only beside the session (:func:`load_beside`).

Every base/adapter variant of a prompt goes into ONE ``generate`` with PEFT's
mixed-adapter batches (``adapter_names=[...]``, ``"__base__"`` for the base).
Rows are grouped by adapter (variant-major), so that each LoRA layer can add an
adapter's update to a contiguous slice of the batch instead of PEFT's per-call
gather/scatter (a hook in ``core/_compat/peft_mixed_batch.py``). Several prompts
share a batch left-padded (up to ``max_batch_rows`` rows). Greedy outputs are token
for token those of running each variant alone.

Sequential runs (one variant at a time, the session's state switched between
runs) are used, and the reason is stated in the result, when PEFT cannot mix:
DoRA adapters, adapters merged into the layers, non-LoRA adapters; and for
sampling, where each column is seeded with the same seed on its own so that it is
reproducible. Merged-folder variants are a separate model and always run alone.

The session selects each variant for its run and restores its active adapter and
enabled state afterwards (:meth:`Session.variant_selected`,
:meth:`Session.mixed_batch_selected`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_studio.core._compat.peft_mixed_batch import contiguous_sub_batches
from lora_studio.core.compare import divergence
from lora_studio.core.compare.variants import BesideModel, Variant
from lora_studio.core.errors import UserError
from lora_studio.core.generation import generate as generation
from lora_studio.core.generation.generate import GenerationSettings
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from lora_studio.core.generation.generate import CausalLM
    from lora_studio.core.session import Session

    # what a generating run calls: a new token of (prompt row, variant); a decoding step done
    Emit = Callable[[int, str, int], None]
    Tick = Callable[[], None]

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MAX_BATCH_ROWS = 16


# -- results -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenDelta:
    """What ``on_tokens`` receives, on the worker thread, as a column grows."""

    prompt_index: int
    variant: str
    token_ids: list[int]
    text: str  # printable text added by these tokens (may be "" while a UTF-8 character is incomplete)


@dataclass(frozen=True)
class VariantOutput:
    name: str
    text: str
    token_ids: list[int]

    def to_json(self) -> dict:
        return {"name": self.name, "text": self.text, "token_ids": list(self.token_ids)}


@dataclass(frozen=True)
class PromptComparison:
    prompt: str
    prompt_token_count: int
    outputs: list[VariantOutput]
    divergence: divergence.DivergenceReport | None = None

    def output(self, name: str) -> VariantOutput:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_json(self) -> dict:
        out = {
            "prompt": self.prompt,
            "prompt_token_count": self.prompt_token_count,
            "variants": [o.to_json() for o in self.outputs],
        }
        if self.divergence is not None:
            out["divergence"] = self.divergence.to_json()
        return out


@dataclass(frozen=True)
class ComparisonResult:
    prompts: list[PromptComparison]
    variants: list[str]
    mixed_batch: bool  # the session's variants ran in mixed-adapter batches
    fallback_reason: str | None  # why they did not (None when they did)
    seconds: float
    settings: GenerationSettings
    # None: a mixed batch gives each variant's solo tokens exactly; else why it may not (half-precision rounding)
    inexact_reason: str | None = None

    @property
    def exact(self) -> bool:
        return self.inexact_reason is None

    def to_json(self) -> dict:
        return {
            "prompts": [p.to_json() for p in self.prompts],
            "variant_names": list(self.variants),
            "mixed_batch": self.mixed_batch,
            "mixed_batch_exact": self.exact,
            "inexact_reason": self.inexact_reason,
            "fallback_reason": self.fallback_reason,
            "seconds": self.seconds,
            "settings": self.settings.to_json(),
        }


# -- the job -------------------------------------------------------------------------------------------------------


def compare(
    session: Session,
    variants: Sequence[Variant],
    prompts: str | Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    *,
    reference: str | None = None,
    score: bool = True,
    mixed: bool = True,
    max_batch_rows: int = MAX_BATCH_ROWS,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    on_tokens: Callable[[TokenDelta], None] | None = None,
) -> ComparisonResult:
    """Generate every variant's continuation of every prompt with the same settings.

    ``reference``: the column the divergence is measured against (default: the
    first variant); ``score``: also compute the teacher-forced scores. ``mixed``:
    False forces sequential runs (what the benchmark compares against).
    ``on_tokens`` is called on this (the worker) thread for each new token of each
    column. Cancel stops within one decoding step and raises Cancelled.
    """
    cancel = cancel or CancelToken()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    variants = list(variants)
    _validate(session, variants, prompts, settings, reference)
    reference = reference or variants[0].name
    started = time.perf_counter()
    tokenizer = session.tokenizer
    ids = [generation.prompt_ids(tokenizer, p, settings.use_chat_template) for p in prompts]
    on_session = [v for v in variants if v.on_session]
    rows = {(i, v.name): ids[i] for i in range(len(prompts)) for v in variants}
    with session.lock:
        outputs, used_mixed, reason = generate_variants(
            session,
            variants,
            rows,
            settings,
            mixed=mixed,
            max_batch_rows=max_batch_rows,
            cancel=cancel,
            report=report,
            on_tokens=on_tokens,
        )
        # Scoring is deterministic, so sampling does not stop it from using one mixed batch.
        score_mixed = mixed and mixed_batch_refusal(session, on_session, GenerationSettings()) is None
        results = []
        for i, prompt in enumerate(prompts):
            outs = [
                VariantOutput(
                    v.name, tokenizer.decode(outputs[(i, v.name)], skip_special_tokens=True), outputs[(i, v.name)]
                )
                for v in variants
            ]
            columns = {o.name: o.token_ids for o in outs}
            firsts = divergence.first_divergences(columns, reference)
            scores = {}
            if score:
                cancel.raise_if_cancelled()
                report(Progress(i, len(prompts), "scoring against " + reference, "prompts"))
                scores = _teacher_forced(session, variants, ids[i], columns[reference], reference, score_mixed)
            report_div = divergence.DivergenceReport(
                reference, [divergence.ColumnDivergence(v.name, firsts[v.name], scores.get(v.name)) for v in variants]
            )
            results.append(PromptComparison(prompt, len(ids[i]), outs, report_div))
    return ComparisonResult(
        results,
        [v.name for v in variants],
        used_mixed,
        None if used_mixed else reason,
        time.perf_counter() - started,
        settings,
        inexact_reason(session) if used_mixed else None,
    )


HALF_PRECISION = ("bfloat16", "float16")


def inexact_reason(session: Session) -> str | None:
    """Why a mixed batch may not give each variant's solo tokens exactly, or None. In float32 it does (the tests
    compare token for token); in half precision a larger batch can round a matmul differently, and a greedy column
    then parts from its solo run once two tokens come close."""
    dtype = str(session.dtype)
    if dtype in HALF_PRECISION:
        return (
            f"in {dtype} a batched column can part from its solo run after some tokens (rounding); "
            "run one at a time for exact outputs"
        )
    return None


def generate_variants(
    session: Session,
    variants: Sequence[Variant],
    rows: dict[tuple[int, str], list[int]],
    settings: GenerationSettings,
    *,
    mixed: bool = True,
    max_batch_rows: int = MAX_BATCH_ROWS,
    cancel: CancelToken,
    report: Report = no_report,
    on_tokens: Callable[[TokenDelta], None] | None = None,
) -> tuple[dict[tuple[int, str], list[int]], bool, str | None]:
    """Every variant's continuation of its prompt rows: ``rows[(i, variant)]`` are the prompt ids of row ``i`` for
    that variant (the same for every variant in Compare; each variant's own history in a chat).

    Returns the new token ids per ``(i, variant)``, whether the session's variants ran in mixed-adapter batches,
    and why not. The caller holds the session's lock.
    """
    tokenizer = session.tokenizer
    count = 1 + max(i for i, _ in rows)
    on_session = [v for v in variants if v.on_session]
    for v in variants:
        model = _beside(v).model if v.kind == "merged" else session.model
        for i in range(count):
            generation.check_context(model, len(rows[(i, v.name)]), settings)

    outputs: dict[tuple[int, str], list[int]] = {}
    streams = {key: generation.TextStream(tokenizer) for key in rows}
    total = len(rows) * settings.max_new_tokens
    produced = [0]

    def emit(prompt_index: int, variant: str, tok: int) -> None:
        produced[0] += 1
        text = streams[(prompt_index, variant)].push(tok)
        if on_tokens is not None:
            on_tokens(TokenDelta(prompt_index, variant, [tok], text))

    def tick() -> None:
        report(Progress(min(produced[0], total), total, "generating", "tokens"))

    reason = mixed_batch_refusal(session, on_session, settings) if mixed else "sequential runs were asked for"
    used_mixed = False
    if on_session and reason is None:
        try:
            _run_mixed(session, on_session, rows, count, settings, max_batch_rows, cancel, emit, tick, outputs)
            used_mixed = True
        except _MixRefused as refused:  # PEFT said no before the first token: run them one at a time
            reason = f"PEFT refused a mixed batch: {refused}"
    if on_session and not used_mixed:
        for v in on_session:
            with session.variant_selected(_adapter_of(v)) as model:
                for i in range(count):
                    cancel.raise_if_cancelled()
                    outputs[(i, v.name)] = _run_rows(
                        model, tokenizer, [rows[(i, v.name)]], settings, cancel, [(i, v.name)], emit, tick
                    )[0]
    for v in variants:
        if v.kind != "merged":
            continue
        for i in range(count):
            cancel.raise_if_cancelled()
            outputs[(i, v.name)] = _run_rows(
                _beside(v).model, tokenizer, [rows[(i, v.name)]], settings, cancel, [(i, v.name)], emit, tick
            )[0]
    for (i, name), stream in streams.items():
        rest = stream.flush()
        if rest and on_tokens is not None:
            on_tokens(TokenDelta(i, name, [], rest))
    return outputs, used_mixed, reason


def _validate(
    session: Session, variants: list[Variant], prompts: list[str], settings: GenerationSettings, reference: str | None
) -> None:
    session.require_loaded()
    if not variants:
        raise UserError("no variants to compare", "tick at least one variant")
    if not prompts:
        raise UserError("there are no prompts", "type a prompt or load a prompts file")
    for p in prompts:
        generation.validate(settings, p)
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two columns are named {dupes[0]!r}", "give each variant a unique name")
    for v in variants:
        if v.kind == "adapter":
            if v.adapter not in session.adapters:
                raise UserError(f"no adapter named {v.adapter!r} is attached", "attach it first")
        elif v.kind == "merged":
            if v.beside is None:
                raise UserError(f"variant {v.name} has no merged model loaded", "load the merged folder first")
        elif v.kind != "base":
            raise UserError(f"unknown variant kind {v.kind!r}", "use base, adapter or merged")
    if reference is not None and reference not in names:
        raise UserError(
            f"the reference column {reference!r} is not among the variants", f"pick one of {', '.join(names)}"
        )


def mixed_batch_refusal(session: Session, variants: Sequence[Variant], settings: GenerationSettings) -> str | None:
    """Why the session's variants cannot share one mixed-adapter batch; None when they can."""
    adapters = [v.adapter for v in variants if v.kind == "adapter"]
    if len(variants) < 2:
        return "fewer than two variants run on the session's model: nothing to batch"
    if not session.is_peft:
        return "the session has no adapters"
    if settings.do_sample:
        return "sampling: each column runs alone, seeded with the same seed, so that it is reproducible"
    from peft import PeftType

    for name in adapters:
        config = session.model.peft_config.get(name)
        if config is None:
            continue
        if config.peft_type != PeftType.LORA:
            return f"{name} is a {config.peft_type.value} adapter; PEFT mixes only LoRA adapters in one batch"
        if getattr(config, "use_dora", False):
            return f"{name} is a DoRA adapter; PEFT cannot mix DoRA adapters in one batch"
    from peft.tuners.lora import LoraLayer

    for module in session.model.modules():
        if isinstance(module, LoraLayer) and getattr(module, "merged", False):
            return "adapter weights are merged into the model's layers; PEFT cannot mix batches then"
    return _probe_refusal(session, adapters)


# model -> {adapters: why they cannot share a batch, or None}
_PROBED: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], str | None]] = weakref.WeakKeyDictionary()


def _probe_refusal(session: Session, adapters: Sequence[str | None]) -> str | None:
    """Some architectures reshape the batch before an adapted layer (OPT flattens batch and time before fc1 and
    fc2), which PEFT's mixed batches cannot follow. One tiny forward with one row per adapter says so before a
    real run; cached per model and set of adapters."""
    import torch

    names = list(dict.fromkeys([*(a for a in adapters if a), BASE]))
    cache = _PROBED.setdefault(session.model, {})
    key = tuple(sorted(names))
    if key not in cache:
        device = next(session.model.parameters()).device
        ids = torch.tensor([[1, 2, 3]] * len(names), device=device)
        reason = None
        try:
            with session.mixed_batch_selected() as model, contiguous_sub_batches(names), torch.inference_mode():
                model(input_ids=ids, adapter_names=names)
        except (ValueError, RuntimeError, TypeError) as exc:
            architecture = type(session.base_model()).__name__
            reason = f"PEFT cannot mix adapters in one batch on {architecture} ({' '.join(str(exc).split())[:160]})"
        cache[key] = reason
    return cache[key]


class _MixRefused(Exception):
    pass


def _run_mixed(
    session: Session,
    variants: Sequence[Variant],
    rows: dict[tuple[int, str], list[int]],
    count: int,
    settings: GenerationSettings,
    max_batch_rows: int,
    cancel: CancelToken,
    emit: Emit,
    tick: Tick,
    outputs: dict[tuple[int, str], list[int]],
) -> None:
    """Variant-major rows, prompts chunked so that a batch has at most ``max_batch_rows`` rows."""
    per_chunk = max(1, max_batch_rows // len(variants))
    with session.mixed_batch_selected() as model:  # a disabled model ignores adapter_names
        for start in range(0, count, per_chunk):
            cancel.raise_if_cancelled()
            chunk = list(range(start, min(count, start + per_chunk)))
            keys = [(i, v.name) for v in variants for i in chunk]
            names = [_batch_name(v) for v in variants for _ in chunk]
            with contiguous_sub_batches(names):
                new = _run_rows(
                    model,
                    session.tokenizer,
                    [rows[key] for key in keys],
                    settings,
                    cancel,
                    keys,
                    emit,
                    tick,
                    model_kwargs={"adapter_names": names},
                    refusable=start == 0,
                )
            for key, toks in zip(keys, new, strict=True):
                outputs[key] = toks


def _run_rows(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[list[int]],
    settings: GenerationSettings,
    cancel: CancelToken,
    keys: list[tuple[int, str]],
    emit: Emit,
    tick: Tick,
    *,
    model_kwargs: dict[str, Any] | None = None,
    refusable: bool = False,
) -> list[list[int]]:
    started = [False]

    def on_step(step: list[int | None]) -> None:
        started[0] = True
        for key, tok in zip(keys, step, strict=True):
            if tok is not None:
                emit(key[0], key[1], tok)
        tick()

    try:
        return generation.generate_rows(
            model, tokenizer, rows, settings, cancel=cancel, on_step=on_step, model_kwargs=model_kwargs
        )
    except (ValueError, TypeError) as exc:
        if refusable and not started[0] and "adapter" in str(exc).lower():
            raise _MixRefused(" ".join(str(exc).split())[:200]) from exc
        raise


def _beside(variant: Variant) -> BesideModel:
    """The model a "merged" variant runs on (``Variant.merged`` always gives it one)."""
    assert variant.beside is not None, variant.name
    return variant.beside


def _batch_name(variant: Variant) -> str:
    """The name a variant's rows carry in a mixed batch: its adapter, or PEFT's name for the base."""
    if variant.kind != "adapter":
        return BASE
    assert variant.adapter is not None, variant.name  # ``Variant.of_adapter`` always names one
    return variant.adapter


def _adapter_of(variant: Variant) -> str | None:
    """What the session selects for a sequential run of ``variant``: its adapter, or None (the base)."""
    return variant.adapter if variant.kind == "adapter" else None


# -- teacher-forced scoring ------------------------------------------------------------------------------------------


def _teacher_forced(
    session: Session,
    variants: Sequence[Variant],
    prompt_ids: Sequence[int],
    continuation: Sequence[int],
    reference: str,
    mixed_ok: bool,
) -> dict[str, divergence.TokenScores]:
    """Each variant's logits over ``continuation`` given the prompt; scores against the reference's."""
    import torch

    if not continuation:
        return {v.name: divergence.TokenScores([], [], []) for v in variants}
    seq = list(prompt_ids) + list(continuation)  # logits at position t predict token t + 1
    logits: dict[str, torch.Tensor] = {}

    keep = len(continuation) + 1  # only the last positions' logits: a [rows, T, vocab] tensor can be GBs

    def forward(model: Any, rows: int, **kw: Any) -> torch.Tensor:
        device = next(model.parameters()).device
        x = torch.tensor([seq] * rows, device=device)
        with torch.inference_mode():
            out = model(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=keep, **kw).logits
        out = out[:, -keep:]  # a model that ignores logits_to_keep returns every position
        return out[:, : len(continuation)].float().cpu()

    on_session = [v for v in variants if v.on_session]
    if on_session:
        if mixed_ok:
            names = [_batch_name(v) for v in on_session]
            with session.mixed_batch_selected() as model, contiguous_sub_batches(names):
                out = forward(model, len(on_session), adapter_names=names)
            for v, row in zip(on_session, out, strict=True):
                logits[v.name] = row
        else:
            for v in on_session:
                with session.variant_selected(_adapter_of(v)) as model:
                    logits[v.name] = forward(model, 1)[0]
    for v in variants:
        if v.kind == "merged":
            logits[v.name] = forward(_beside(v).model, 1)[0]
    ref = logits[reference]
    return {v.name: divergence.token_scores(ref, logits[v.name], continuation) for v in variants}
