"""``lora-studio merge BASE --adapter PATH [...] --out DIR``.

Merge adapters into the base and save a deployable folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.cli.common import (
    SubParsers,
    add_adapter_argument,
    add_base_argument,
    add_merge_into_argument,
    add_quantize_argument,
    comma_list,
    human_bytes,
    output_path,
    parse_adapter_specs,
    print_json,
    resolve_base,
    stderr_progress,
)
from lora_studio.core.errors import UserError

if TYPE_CHECKING:
    from lora_studio.core.merge import AdapterSpec


def add_parser(sub: SubParsers) -> None:
    from lora_studio.core.adapters.combinations import COMBINATIONS
    from lora_studio.core.merge import ENGINES
    from lora_studio.core.model.dtypes import DTYPES

    p = sub.add_parser("merge", help="merge LoRA adapters into the base and save a verified model folder")
    add_base_argument(p)
    add_adapter_argument(p, "adapter folder to merge, optionally named NAME=PATH (repeat to combine several)")
    p.add_argument("--weights", help="comma-separated weights, one per adapter (with --combination)")
    p.add_argument(
        "--scale",
        type=float,
        metavar="S",
        help="merge a single adapter at S times its trained strength (PEFT's set_scale; default 1)",
    )
    p.add_argument(
        "--combination", choices=COMBINATIONS, help="how to combine several adapters (PEFT add_weighted_adapter)"
    )
    p.add_argument("--density", type=float, help="fraction of entries kept, for ties, dare_* and magnitude_prune")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the saved weights (default: the base's)")
    p.add_argument(
        "--engine", choices=ENGINES, help="streaming (low memory, default where it applies) or in-memory (PEFT)"
    )
    p.add_argument("--safe-merge", action="store_true", help="in-memory engine: PEFT's NaN/Inf check while merging")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the saved model with the adapter model")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder (atomically, at the end)"
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="save the weighted combination (--combination) as a PEFT adapter folder instead of merging it",
    )
    add_quantize_argument(p, "the adapter learned on (QLoRA; default: its lora_studio.json record); measure it on")
    add_merge_into_argument(
        p,
        "for an adapter trained on a quantised base: merge into the checkpoint's weights (original), into the "
        "dequantised ones it learned on (dequantized), or the closer of the two, measured (auto, the default)",
    )
    p.add_argument(
        "--full-precision",
        metavar="DIR",
        help="for a base saved quantised (bitsandbytes): the 16/32-bit folder it was quantised from, whose weights "
        "are the original ones to merge into or measure against",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in comma_list(text, "--weights")]
    except ValueError as exc:
        raise UserError(
            f"--weights {text!r} is not a comma-separated list of numbers", "write e.g. --weights 0.7,0.3"
        ) from exc
    if len(weights) != count:
        raise UserError(f"--weights has {len(weights)} values for {count} adapters", "give one weight per --adapter")
    return weights


def run(args: argparse.Namespace) -> int:
    from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save

    specs = parse_adapter_specs(args.adapter)
    if not specs:
        raise UserError("no adapter given", "pass --adapter PATH (repeat it to combine several)")
    if args.weights is not None and args.combination is None:
        raise UserError("--weights needs --combination", "add e.g. --combination linear")
    if args.density is not None and args.combination is None:
        raise UserError("--density needs --combination", "add e.g. --combination ties")
    if args.scale is not None and (args.combination is not None or len(specs) > 1):
        raise UserError("--scale applies to a single adapter", "for a combination, give --weights")
    weights = parse_weights(args.weights, len(specs)) if args.scale is None else [args.scale]
    adapters = [AdapterSpec(name, path, w) for (name, path), w in zip(specs, weights, strict=True)]
    if args.adapter_only:
        return _save_adapter_only(args, adapters)
    progress = stderr_progress()
    source = resolve_base(args, report=progress)
    options = MergeOptions(
        out=output_path(args.out),
        dtype=args.dtype,
        engine=args.engine,
        combination=args.combination,
        density=args.density,
        safe_merge=args.safe_merge,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        quantize=args.quantize,
        merge_into=args.merge_into,
        full_precision=Path(args.full_precision).expanduser() if args.full_precision else None,
    )
    try:
        result = merge_and_save(source, adapters, options, report=progress)
    finally:
        progress.done()
    if args.json:
        print_json(result.to_json())
        return 0
    v = result.verification
    print(f"Saved     {result.out}")
    print(
        f"Engine    {result.engine}, {result.dtype}, {len(result.files)} shard(s), "
        f"{human_bytes(result.bytes_written)} in {result.seconds:.1f} s"
    )
    if result.quantized_base is not None:
        print(f"QLoRA     {result.quantized_base.summary()}")
    print(f"Verified  {v.summary() if v else 'skipped (--no-verify)'}")
    if v is not None and v.status != "pass":
        sys.stderr.write(
            "lora-studio: warning: the merged model differs from the adapter model more than expected for "
            f"{result.dtype}; see {result.out / 'README.md'}\n"
        )
    return 0


def _save_adapter_only(args: argparse.Namespace, adapters: list[AdapterSpec]) -> int:
    """``--adapter-only``: the combination as an adapter folder (PEFT's save), nothing merged or verified."""
    from lora_studio.core.merge import save_combination

    if args.combination is None or len(adapters) < 2:
        raise UserError("--adapter-only saves a combination", "give two or more --adapter and a --combination")
    for flag, given in (("--engine", args.engine), ("--safe-merge", args.safe_merge)):
        if given:
            raise UserError(f"{flag} applies to a merge, not to --adapter-only", f"drop {flag}")
    progress = stderr_progress()
    source = resolve_base(args, report=progress)
    try:
        saved = save_combination(
            source,
            adapters,
            [a.weight for a in adapters],
            args.combination,
            output_path(args.out),
            density=args.density,
            overwrite=args.overwrite,
            dtype=args.dtype,
            report=progress,
        )
    finally:
        progress.done()
    if args.json:
        print_json(saved.to_json())
        return 0
    print(f"Saved     {saved.out}")
    print(
        f"Adapter   {saved.combination} of {len(saved.adapters)} adapters, rank {saved.rank}, "
        f"{human_bytes(saved.bytes_written)} in {saved.seconds:.1f} s (load it on the base with PEFT)"
    )
    return 0
