"""``lora-studio compare BASE --adapter NAME=PATH... [--merged PATH] --prompt TEXT``: the variants side by side.

The base and every adapter go through one mixed-adapter batch (see
core/comparison.py); a merged model folder runs beside them. Text streams to the
terminal for a single variant only; with several, the columns print when done.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.cli.common import (
    SubParsers,
    add_adapter_argument,
    add_base_argument,
    add_max_memory_argument,
    add_quantize_argument,
    base_path,
    check_report_path,
    load_base,
    parse_adapter_specs,
    print_json,
    resolve_base,
    stderr_progress,
    table,
)
from lora_studio.core.errors import UserError
from lora_studio.core.model.dtypes import DTYPES

if TYPE_CHECKING:
    from lora_studio.core.compare import ComparisonResult


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("compare", help="generate with the base, each adapter and a merged model side by side")
    add_base_argument(p)
    add_adapter_argument(p, "adapter folder to compare, optionally named: NAME=PATH (repeatable)")
    p.add_argument(
        "--merged",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a merged model folder to compare beside the session (repeatable)",
    )
    p.add_argument(
        "--base-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the base with adapters disabled as a column (default: yes)",
    )
    p.add_argument("--prompt", help="the prompt (the chat template is applied when the tokenizer has one)")
    p.add_argument("--prompts-file", metavar="FILE", help='prompts: .txt one per line, or .jsonl with a "prompt" field')
    p.add_argument("--raw", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="new tokens per variant (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling top-p (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every variant (default 0)")
    p.add_argument("--reference", metavar="NAME", help="the column divergence is measured against (default: the first)")
    p.add_argument("--sequential", action="store_true", help="run variants one at a time instead of one mixed batch")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load in (default float32)")
    add_quantize_argument(p, "load the base")
    add_max_memory_argument(p)
    p.add_argument("--device-map", default="cpu", help="cpu, cuda:N, mps (Apple silicon) or auto (default cpu)")
    p.add_argument("--report", metavar="FILE", help="also write a report: .html, .md, .jsonl, .csv or .json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    from lora_studio.core.generation.prompts import load_prompts

    if args.prompt is not None and args.prompts_file:
        raise UserError("give either --prompt or --prompts-file, not both", "drop one of them")
    if args.prompts_file:
        return load_prompts(args.prompts_file)
    if args.prompt is None:
        raise UserError("no prompt given", "pass --prompt TEXT or --prompts-file FILE")
    return [args.prompt]


def run(args: argparse.Namespace) -> int:
    from lora_studio.core import compare as comparison
    from lora_studio.core.generation.generate import GenerationSettings, validate
    from lora_studio.core.session import Session

    # Everything a user can get wrong is checked before the (slow) model load.
    prompts = _prompts(args)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        use_chat_template=not args.raw,
    )
    for prompt in prompts:
        validate(settings, prompt)
    adapters = parse_adapter_specs(args.adapter)
    merged = parse_adapter_specs(args.merged)
    for name, path in adapters + merged:
        if not path.exists():
            raise UserError(f"{path} does not exist", f"check the path given for {name}")
    names = (["base"] if args.base_variant else []) + [n for n, _ in adapters] + [n for n, _ in merged]
    if not names:
        raise UserError("nothing to compare", "add --adapter or --merged, or keep the base variant")
    if len(set(names)) != len(names):
        raise UserError(
            f"two variants are named {next(n for n in names if names.count(n) > 1)!r}", "name them with NAME=PATH"
        )
    if args.reference is not None and args.reference not in names:
        raise UserError(f"--reference {args.reference!r} is not a variant", f"pick one of {', '.join(names)}")
    inputs = {
        "base model": base_path(args),
        "prompts file": Path(args.prompts_file).expanduser() if args.prompts_file else None,
        **{f"variant {name}": path for name, path in adapters + merged},
    }
    report_path = (
        check_report_path(args.report, overwrite=args.overwrite, inputs=inputs) if args.report is not None else None
    )

    progress = stderr_progress()
    source = resolve_base(args, report=progress)
    session = Session()
    try:
        load_base(session, source, args, progress)
        variants = [comparison.Variant.base()] if args.base_variant else []
        for name, path in adapters:
            session.attach(path, name, report=progress)
            variants.append(comparison.Variant.of_adapter(name))
        for name, path in merged:
            variants.append(comparison.Variant.merged(comparison.load_beside(path, session, report=progress), name))
        result = comparison.compare(
            session, variants, prompts, settings, reference=args.reference, mixed=not args.sequential, report=progress
        )
        if report_path is not None:
            from lora_studio.core.evaluate.provenance import comparison_report
            from lora_studio.core.report.share import write_report

            doc = comparison_report(session, result, variants)
            write_report(doc, report_path, overwrite=args.overwrite, inputs=inputs)
    finally:
        progress.done()
        session.close()
    if args.json:
        print_json(to_json(result))
    else:
        print(render(result))
        if report_path is not None:
            print(f"\nreport: {report_path}")
    return 0


def to_json(result: ComparisonResult) -> dict[str, Any]:
    """The single-prompt shape {"prompt", "variants", "mixed_batch", "seconds", ...}.

    Several prompts go under "prompts".
    """
    common = {
        "mixed_batch": result.mixed_batch,
        "mixed_batch_exact": result.exact,
        "inexact_reason": result.inexact_reason,
        "fallback_reason": result.fallback_reason,
        "seconds": round(result.seconds, 3),
        "settings": result.settings.to_json(),
    }
    if len(result.prompts) == 1:
        return {**result.prompts[0].to_json(), **common}
    return {"prompts": [p.to_json() for p in result.prompts], **common}


def render(result: ComparisonResult) -> str:
    out = []
    how = "one mixed-adapter batch" if result.mixed_batch else f"one at a time ({result.fallback_reason})"
    out.append(f"{len(result.variants)} variants, {how}, {result.seconds:.1f}s")
    if result.inexact_reason:
        out.append(f"note: {result.inexact_reason} (--sequential)")
    for p in result.prompts:
        out.append("")
        out.append("=" * 72)
        out.append("Prompt: " + p.prompt)
        div = p.divergence
        for o in p.outputs:
            col = div.column(o.name) if div else None
            out.append("")
            head = f"--- {o.name} ({len(o.token_ids)} tokens)"
            if div is not None and col is not None and o.name != div.reference:
                fd = "identical" if col.first_divergence is None else f"differs from token {col.first_divergence}"
                head += f"  vs {div.reference}: {fd}"
            out.append(head)
            for para in (o.text.strip() or "(empty)").splitlines() or [""]:
                out.append(textwrap.fill(para, 100) if para else "")
        if div is not None and any(c.scores for c in div.columns):
            rows = [
                [
                    c.name,
                    "-" if c.first_divergence is None else str(c.first_divergence),
                    f"{c.scores.mean_kl:.4f}" if c.scores else "-",
                    f"{c.scores.agreement:.1f}%" if c.scores else "-",
                    f"{c.scores.mean_logprob:.3f}" if c.scores else "-",
                ]
                for c in div.columns
            ]
            out.append("")
            out.append(f"Teacher-forced on {div.reference}'s continuation:")
            out.append(table(rows, ["variant", "first diff", "mean KL", "agreement", "mean logprob"]))
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run through `lora-studio compare`")
