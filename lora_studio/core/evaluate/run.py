"""The evaluation job: every ticked variant scored on every example, summarised per set and overall.

Variants of the session (the base and its adapters, combinations included) run in ONE mixed-adapter batch per
group of examples (PEFT's ``adapter_names``, rows grouped by adapter as in Compare); the results equal running
each variant alone (:func:`evaluate` with ``mixed=False``, what the benchmark and the tests compare against).
Sequential runs are used, and the reason stated, where PEFT cannot mix (DoRA, merged layers, non-LoRA adapters).
A merged folder loaded beside the session runs alone; a GGUF runs in llama.cpp, one example at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_studio import __version__
from lora_studio.core._compat.peft_mixed_batch import contiguous_sub_batches
from lora_studio.core._compat.shared_prefix import shared_prefix
from lora_studio.core.compare.runs import BASE, mixed_batch_refusal
from lora_studio.core.compare.variants import Variant
from lora_studio.core.errors import UserError
from lora_studio.core.evaluate import scoring, stats
from lora_studio.core.evaluate.columns import Column, GgufVariant
from lora_studio.core.evaluate.datasets import EvalExample, EvalSet
from lora_studio.core.evaluate.provenance import base_provenance, variant_provenance
from lora_studio.core.evaluate.scoring import ExampleScore
from lora_studio.core.generation.generate import pad_token_id
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch

    from lora_studio.core.session import Session

VariantKind = Literal["base", "adapter", "combination", "merged", "gguf"]


@dataclass(frozen=True)
class VariantSummary:
    name: str
    dataset: str | None  # None: every set together
    loss: float
    perplexity: float
    accuracy: float
    kl: float | None
    tokens: int
    examples: int
    delta_loss: float | None  # against the reference; None for the reference itself
    delta_ci: stats.Interval | None
    regressions: int

    @property
    def significant(self) -> bool:
        """The interval of Δloss excludes 0: more than noise."""
        return self.delta_ci is not None and self.delta_ci.excludes_zero

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "kl": self.kl,
            "tokens": self.tokens,
            "examples": self.examples,
            "delta_loss": self.delta_loss,
            "delta_ci": [self.delta_ci.low, self.delta_ci.high] if self.delta_ci else None,
            "regressions": self.regressions,
        }


@dataclass(frozen=True)
class EvaluationResult:
    sets: list[EvalSet]
    variants: list[dict[str, Any]]  # provenance of each column: name, kind, path, sha256, scale
    reference: str
    scores: dict[str, list[ExampleScore]]  # per variant, in example order
    summary: list[VariantSummary]
    regressed: dict[int, list[str]]  # example index -> variants for which it is a regression
    mixed_batch: bool
    fallback_reason: str | None
    seconds: float
    base: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def examples(self) -> list[EvalExample]:
        return [e for s in self.sets for e in s.examples]

    @property
    def names(self) -> list[str]:
        return [v["name"] for v in self.variants]

    def overall(self, name: str) -> VariantSummary:
        return next(s for s in self.summary if s.name == name and s.dataset is None)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "evaluation",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lora_studio": __version__,
            "base": self.base,
            "datasets": [s.to_json() for s in self.sets],
            "variants": self.variants,
            "reference": self.reference,
            "mixed_batch": self.mixed_batch,
            "fallback_reason": self.fallback_reason,
            "seconds": self.seconds,
            "settings": self.settings,
            "summary": [s.to_json() for s in self.summary],
            "examples": [
                {
                    "index": e.index,
                    "dataset": e.dataset,
                    "source_row": e.source_row,
                    "prompt": e.prompt,
                    "answer": e.answer,
                    "scores": {name: self.scores[name][i].to_json() for name in self.names},
                    "regressed": self.regressed.get(e.index, []),
                }
                for i, e in enumerate(self.examples)
            ],
        }


# -- the job ---------------------------------------------------------------------------------------------------------


def evaluate(
    session: Session,
    columns: Sequence[Column],
    sets: Sequence[EvalSet],
    *,
    reference: str | None = None,
    mixed: bool = True,
    batch_examples: int | None = None,
    bootstrap_samples: int = stats.BOOTSTRAP_SAMPLES,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> EvaluationResult:
    """Score every column on every example of ``sets``; KL and Δloss against ``reference`` (default: the base
    when it is ticked, else the first column).

    ``mixed``: False runs each variant of the session alone (the same groups of examples), what the mixed batch
    must equal; ``batch_examples=1`` runs one example at a time (a hand-written PEFT loop).
    """
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    columns = list(columns)
    examples = [e for s in sets for e in s.examples]
    reference = _check(session, columns, examples, reference)
    on_session = [c for c in columns if isinstance(c, Variant) and c.on_session]
    with session.lock:
        reason = mixed_batch_refusal(session, on_session, _GREEDY) if mixed else "sequential runs were asked for"
        if len(on_session) < 2:
            reason = None  # nothing to batch: not a fallback
        vocab = session.model.get_output_embeddings().weight.shape[0]
        rows = [(e.prompt_ids, e.answer_ids) for e in examples]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))  # little padding
        copies = len(on_session) if reason is None else 1
        groups = [[order[i] for i in g] for g in scoring.chunks([rows[i] for i in order], max(1, copies), vocab)]
        if batch_examples is not None:
            groups = [g[i : i + batch_examples] for g in groups for i in range(0, len(g), max(1, batch_examples))]
        scores: dict[str, list[ExampleScore | None]] = {_name(c): [None] * len(examples) for c in columns}
        done = 0
        used = 1 + max((max(p + a, default=0) for p, a in rows), default=0)  # the largest token id the rows hold
        runners = _gguf_runners(columns, used, vocab)
        try:
            for group in groups:
                cancel.raise_if_cancelled()
                report(Progress(done, len(examples), f"scoring examples {done}/{len(examples)}", "examples"))
                group_rows = [rows[i] for i in group]
                logprobs = _group_logprobs(session, columns, on_session, group_rows, reason is None, runners)
                refs = [scoring.Reference(lp) for lp in logprobs[reference]]
                for name, per_row in logprobs.items():
                    for k, i in enumerate(group):
                        scores[name][i] = scoring.score(per_row[k], rows[i][1], refs[k])
                done += len(group)
        finally:
            for runner in runners.values():
                runner.close()
    report(Progress(len(examples), len(examples), "summarising", "examples"))
    final = {name: [s for s in per if s is not None] for name, per in scores.items()}
    summary, regressed = summarise(final, list(sets), reference, samples=bootstrap_samples)
    return EvaluationResult(
        list(sets),
        [variant_provenance(session, c) for c in columns],
        reference,
        final,
        summary,
        regressed,
        mixed_batch=reason is None and len(on_session) >= 2,
        fallback_reason=reason,
        seconds=time.perf_counter() - started,
        base=base_provenance(session),
        settings={"reference": reference, "bootstrap_samples": bootstrap_samples, "confidence": stats.CONFIDENCE},
    )


def _check(session: Session, columns: list[Column], examples: list[EvalExample], reference: str | None) -> str:
    session.require_loaded()
    if not columns:
        raise UserError("no variants to evaluate", "tick at least one variant")
    if not examples:
        raise UserError("the evaluation data has no examples", "pick a file with rows")
    names = [_name(c) for c in columns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two variants are named {dupes[0]!r}", "give each variant a unique name")
    for c in columns:
        if isinstance(c, Variant) and c.kind == "adapter" and c.adapter not in session.adapters:
            raise UserError(f"no adapter named {c.adapter!r} is attached", "attach it first")
        if isinstance(c, Variant) and c.kind == "merged" and c.beside is None:
            raise UserError(f"variant {c.name} has no merged model loaded", "load the merged folder first")
    if reference is None:
        bases = [c for c in columns if isinstance(c, Variant) and c.kind == "base"]
        return _name(bases[0] if bases else columns[0])
    if reference not in names:
        raise UserError(f"the reference {reference!r} is not among the variants", f"pick one of {', '.join(names)}")
    return reference


def _name(column: Column) -> str:
    return column.name


class _Greedy:
    do_sample = False  # what mixed_batch_refusal asks of the settings: scoring is deterministic


_GREEDY: Any = _Greedy()


def _group_logprobs(
    session: Session,
    columns: list[Column],
    on_session: list[Variant],
    rows: Sequence[scoring.Row],
    mixed: bool,
    runners: dict[str, Any],
) -> dict[str, list[torch.Tensor]]:
    pad = pad_token_id(session.model, session.tokenizer)
    out: dict[str, list[torch.Tensor]] = {}
    if on_session and mixed and len(on_session) >= 2:
        names = [v.adapter if v.kind == "adapter" and v.adapter else BASE for v in on_session for _ in rows]
        with (
            session.mixed_batch_selected() as model,
            contiguous_sub_batches(names),
            shared_prefix(model, len(rows), len(on_session)) as shared,
        ):
            # shared: the model gets each example once and copies it where the first adapter layer starts
            batch = rows if shared else [r for _ in on_session for r in rows]
            per_row = scoring.answer_logprobs(
                model, batch, pad, {"adapter_names": names}, copies=len(on_session) if shared else 1
            )
        for k, v in enumerate(on_session):
            out[v.name] = per_row[k * len(rows) : (k + 1) * len(rows)]
    else:
        for v in on_session:
            with session.variant_selected(v.adapter if v.kind == "adapter" else None) as model:
                out[v.name] = scoring.answer_logprobs(model, rows, pad)
    for c in columns:
        if isinstance(c, Variant) and c.kind == "merged":
            assert c.beside is not None  # checked in _check
            out[c.name] = scoring.answer_logprobs(c.beside.model, rows, pad)
        elif isinstance(c, GgufVariant):
            runner = runners[c.name]
            out[c.name] = [
                scoring.logprobs_from_logits(runner.logits(list(p) + list(a)), len(p), len(a)) for p, a in rows
            ]
    return {_name(c): out[_name(c)] for c in columns}


def _gguf_runners(columns: list[Column], vocab: int | None = None, model_vocab: int | None = None) -> dict[str, Any]:
    ggufs = [c for c in columns if isinstance(c, GgufVariant)]
    if not ggufs:
        return {}
    from lora_studio.core.export.runtime import GgufRunner

    runners: dict[str, Any] = {}
    try:
        for c in ggufs:
            runner = runners[c.name] = GgufRunner(c.path, c.lora, n_ctx=2048)
            if vocab is not None and runner.llm.n_vocab() < vocab:  # llama_decode would fail on such ids
                raise UserError(
                    f"{c.name}: {Path(c.path).name} has {runner.llm.n_vocab():,} tokens, fewer than the base's "
                    f"tokenizer uses ({vocab:,}): it is another model's GGUF",
                    "give a GGUF of this base (its own export)",
                )
            if model_vocab is not None and runner.llm.n_vocab() > model_vocab:  # its logits mean other tokens
                raise UserError(
                    f"{c.name}: {Path(c.path).name} has {runner.llm.n_vocab():,} tokens, more than the base's "
                    f"{model_vocab:,}: it is another model's GGUF, and its scores would not compare",
                    "give a GGUF of this base (its own export)",
                )
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    return runners


# -- summaries -------------------------------------------------------------------------------------------------------


def summarise(
    scores: dict[str, list[ExampleScore]], sets: list[EvalSet], reference: str, *, samples: int = 1000
) -> tuple[list[VariantSummary], dict[int, list[str]]]:
    """Per variant: overall and per set (when there are several), with Δloss and its interval against the
    reference; and the examples where a variant is a regression against the base (or the reference)."""
    import math

    examples = [e for s in sets for e in s.examples]
    base = "base" if "base" in scores else reference
    regressed: dict[int, list[str]] = {}
    for name, per in scores.items():
        if name == base:
            continue
        for e, variant_score, base_score in zip(examples, per, scores[base], strict=True):
            if stats.is_regression(variant_score.loss, base_score.loss):
                regressed.setdefault(e.index, []).append(name)
    parts: list[tuple[str | None, list[int]]] = [(None, list(range(len(examples))))]
    if len(sets) > 1:
        offset = 0
        for eval_set in sets:
            parts.append((eval_set.name, list(range(offset, offset + len(eval_set.examples)))))
            offset += len(eval_set.examples)
    out = []
    for dataset, picks in parts:
        for name, per in scores.items():
            mine = [per[i] for i in picks]
            ref = [scores[reference][i] for i in picks]
            counts = [s.tokens for s in mine]
            loss = stats.weighted_mean([s.nll for s in mine], counts)
            kls = [s.kl for s in mine]
            kl = None if any(k is None for k in kls) else stats.weighted_mean([k or 0.0 for k in kls], counts)
            delta = ci = None
            if name != reference:
                delta = loss - stats.weighted_mean([s.nll for s in ref], counts)
                if samples > 0:
                    ci = stats.paired_difference_interval(
                        [s.nll for s in mine], [s.nll for s in ref], counts, samples=samples
                    )
            out.append(
                VariantSummary(
                    name,
                    dataset,
                    loss,
                    math.exp(min(loss, 700.0)),
                    stats.weighted_mean([s.correct for s in mine], counts),
                    kl,
                    sum(counts),
                    len(mine),
                    delta,
                    ci,
                    sum(name in regressed.get(examples[i].index, []) for i in picks),
                )
            )
    return out, regressed
