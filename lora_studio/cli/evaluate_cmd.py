"""``lora-studio evaluate BASE --adapter NAME=PATH... --data FILE``: loss, perplexity, accuracy and KL per variant.

Every adapter runs with the base in one mixed-adapter batch (core/evaluate); merged folders and GGUF files run
beside them. Differences from the reference come with a 95 % bootstrap interval; ``--sweep NAME`` also tries
the adapter at several scales; ``--report out.html`` writes a shareable report (HTML, Markdown, JSONL or CSV).
"""

from __future__ import annotations

import argparse
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

DEFAULT_SWEEP = "0:1.5:0.25"

if TYPE_CHECKING:
    from lora_studio.core.evaluate.columns import Column


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("evaluate", help="score the base, adapters, merged folders and GGUF files on a dataset")
    add_base_argument(p)
    add_adapter_argument(p, "adapter folder to evaluate, optionally named: NAME=PATH (repeatable)")
    p.add_argument("--merged", action="append", default=[], metavar="[NAME=]PATH", help="a merged model folder")
    p.add_argument("--gguf", action="append", default=[], metavar="[NAME=]FILE", help="a GGUF file (llama.cpp)")
    p.add_argument(
        "--combine",
        action="append",
        default=[],
        metavar="NAME=A:W,B:W",
        help="a weighted combination of the given adapters (PEFT add_weighted_adapter), e.g. mix=a:0.5,b:0.5",
    )
    p.add_argument("--combination-type", default="cat", help="the combination's type (default cat)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help="evaluation data: JSONL, CSV, Parquet or a save_to_disk folder (repeatable; default: the adapters' "
        "validation sets, else the demo sets)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="the first N rows of each file only")
    p.add_argument(
        "--base-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the base with adapters disabled (default: yes)",
    )
    p.add_argument("--reference", metavar="NAME", help="KL and Δloss against this variant (default: the base)")
    p.add_argument("--scale", action="append", default=[], metavar="NAME=S", help="run adapter NAME at scale S")
    p.add_argument("--sweep", metavar="NAME", help="also sweep adapter NAME's scale")
    p.add_argument("--scales", help=f"scales of the sweep: 0,0.5,1 or 0:1.5:0.25 (default {DEFAULT_SWEEP})")
    p.add_argument("--sequential", action="store_true", help="run variants one at a time instead of one mixed batch")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load in (default float32)")
    add_quantize_argument(p, "load the base")
    add_max_memory_argument(p)
    p.add_argument("--device-map", default="cpu", help="cpu, cuda:N, mps (Apple silicon) or auto (default cpu)")
    p.add_argument("--report", metavar="FILE", help="write a report: .html, .md, .jsonl, .csv or .json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _combinations(specs: list[str], adapters: list[str]) -> list[tuple[str, dict[str, float]]]:
    out = []
    for spec in specs:
        name, sep, members = spec.partition("=")
        if not sep or not name.strip() or not members.strip():
            raise UserError(f"--combine {spec!r} is not NAME=A:W,B:W", "e.g. --combine mix=pirate:0.5,sql:0.5")
        weights: dict[str, float] = {}
        for part in members.split(","):
            adapter, colon, weight = part.partition(":")
            adapter = adapter.strip()
            if adapter not in adapters:
                raise UserError(f"--combine {name}: {adapter!r} is not a given --adapter", "name adapters with NAME=")
            if adapter in weights:
                raise UserError(f"--combine {name}: {adapter!r} is named twice", "give each adapter one weight")
            try:
                weights[adapter] = float(weight) if colon else 1.0
            except ValueError:
                raise UserError(f"--combine {name}: weight {weight!r} is not a number", "e.g. pirate:0.5") from None
        out.append((name.strip(), weights))
    return out


def _scales(specs: list[str]) -> dict[str, float]:
    from lora_studio.core.session import check_scale

    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise UserError(f"--scale {spec!r} is not NAME=S", "e.g. --scale pirate=0.75")
        try:
            out[name.strip()] = check_scale(float(value))
        except ValueError:
            raise UserError(f"--scale {spec!r}: {value!r} is not a number", "e.g. --scale pirate=0.75") from None
    return out


def run(args: argparse.Namespace) -> int:
    from lora_studio.core.compare import Variant, load_beside
    from lora_studio.core.evaluate import datasets
    from lora_studio.core.evaluate.columns import GgufVariant
    from lora_studio.core.evaluate.run import evaluate
    from lora_studio.core.evaluate.scale import parse_scales, sweep_scale
    from lora_studio.core.io.paths import regular_file
    from lora_studio.core.model.sources import check_gguf_file
    from lora_studio.core.session import Session

    # Everything a user can get wrong is checked before the (slow) model load.
    adapters = parse_adapter_specs(args.adapter)
    merged = parse_adapter_specs(args.merged)
    ggufs = parse_adapter_specs(args.gguf)
    for name, path in adapters + merged:
        if not path.exists():
            raise UserError(f"{path} does not exist", f"check the path given for {name}")
        regular_file(path, name)  # a pipe would block the load for ever
    for name, path in ggufs:
        check_gguf_file(path, name)
    combos = _combinations(args.combine, [n for n, _ in adapters])
    scales = _scales(args.scale)
    names = (
        (["base"] if args.base_variant else [])
        + [n for n, _ in adapters]
        + [n for n, _ in combos]
        + [n for n, _ in merged + ggufs]
    )
    if not names:
        raise UserError("nothing to evaluate", "add --adapter, --merged or --gguf, or keep the base variant")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two variants are named {dupes[0]!r}", "name them with NAME=PATH")
    if args.reference is not None and args.reference not in names:
        raise UserError(f"--reference {args.reference!r} is not a variant", f"pick one of {', '.join(names)}")
    for name in [*scales, *([args.sweep] if args.sweep else [])]:
        if name not in [n for n, _ in adapters]:
            raise UserError(f"{name!r} is not a given --adapter", "scale and sweep adapters given with --adapter")
    if args.scales is not None and not args.sweep:
        raise UserError("--scales are the points of a sweep", "add --sweep NAME, or drop --scales")
    sweep_values = parse_scales(args.scales or DEFAULT_SWEEP) if args.sweep else []
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1", "e.g. --limit 32")
    data = [Path(d).expanduser() for d in args.data] or datasets.default_sets([p for _, p in adapters])
    if not data:
        raise UserError("no evaluation data", "pass --data FILE (JSONL, CSV, Parquet)")
    inputs = {
        "base model": base_path(args),
        **{f"variant {name}": path for name, path in adapters + merged + ggufs},
        **{f"data file {n + 1}": path for n, path in enumerate(data)},
    }
    report_path = (
        check_report_path(args.report, overwrite=args.overwrite, inputs=inputs) if args.report is not None else None
    )

    progress = stderr_progress()
    source = resolve_base(args, report=progress)
    session = Session()
    try:
        load_base(session, source, args, progress)
        sets = datasets.load_eval_sets(
            data, session.tokenizer, limit=args.limit, max_length=datasets.max_length_for(session.model)
        )
        columns: list[Column] = [Variant.base()] if args.base_variant else []
        for name, path in adapters:
            session.attach(path, name, report=progress)
            columns.append(Variant.of_adapter(name))
        for name, scale in scales.items():
            session.set_scale(name, scale)
        for name, weights in combos:
            session.register_combination(name, weights, args.combination_type)
            columns.append(Variant.of_adapter(name))
        for name, path in merged:
            columns.append(Variant.merged(load_beside(path, session, report=progress), name))
        columns += [GgufVariant(name, path) for name, path in ggufs]
        result = evaluate(session, columns, sets, reference=args.reference, mixed=not args.sequential, report=progress)
        sweep = sweep_scale(session, args.sweep, sets, sweep_values, report=progress) if args.sweep else None
    finally:
        progress.done()
        session.close()
    doc = result.to_json()
    if sweep is not None:
        doc["scale_sweep"] = sweep.to_json()
    if report_path is not None:
        from lora_studio.core.report.share import write_report

        write_report(doc, report_path, overwrite=args.overwrite, inputs=inputs)
    if args.json:
        print_json(doc)
    else:
        print(render(doc))
        if report_path is not None:
            print(f"\nreport: {report_path}")
    return 0


def render(doc: dict[str, Any]) -> str:
    how = "one mixed-adapter batch" if doc["mixed_batch"] else f"one at a time ({doc['fallback_reason'] or '-'})"
    sets = ", ".join(f"{d['name']} ({d['rows']})" for d in doc["datasets"])
    out = [f"{len(doc['variants'])} variants on {sets}, {how}, {doc['seconds']:.1f}s", ""]
    for dataset in [None] + ([d["name"] for d in doc["datasets"]] if len(doc["datasets"]) > 1 else []):
        rows = []
        for s in (s for s in doc["summary"] if s["dataset"] == dataset):
            delta = "-" if s["delta_loss"] is None else f"{s['delta_loss']:+.4f}"
            ci = s["delta_ci"]
            if ci is not None:
                delta += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" + (" *" if ci[0] > 0 or ci[1] < 0 else "")
            rows.append(
                [
                    s["name"],
                    f"{s['loss']:.4f}",
                    f"{s['perplexity']:.2f}",
                    f"{100 * s['accuracy']:.1f}%",
                    "-" if s["kl"] is None else f"{s['kl']:.4f}",
                    delta,
                    str(s["regressions"]),
                ]
            )
        out.append(f"{dataset or 'all sets'} ({doc['reference']} is the reference; * : the 95 % interval excludes 0)")
        out.append(table(rows, ["variant", "loss", "ppl", "accuracy", "KL", "Δloss [95% CI]", "regressions"]))
        out.append("")
    sweep = doc.get("scale_sweep")
    if sweep:
        rows = [
            [f"{p['scale']:g}", f"{p['loss']:.4f}", f"{p['kl_from_base']:.4f}", f"{100 * p['accuracy']:.1f}%"]
            for p in sweep["points"]
        ]
        out.append(f"scale sweep of {sweep['adapter']} (best: {sweep['best_scale']:g})")
        out.append(table(rows, ["scale", "loss", "KL from base", "accuracy"]))
    return "\n".join(out).rstrip()
