"""``lora-studio inspect BASE [--adapter NAME=PATH]... [--json]``.

What a base and its adapters are, without loading weights.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lora_studio.cli.common import (
    SubParsers,
    add_adapter_argument,
    add_base_argument,
    add_max_memory_argument,
    add_quantize_argument,
    human_bytes,
    max_memory_of,
    parse_adapter_specs,
    print_json,
    resolve_base,
    table,
)
from lora_studio.core.model.dtypes import DTYPES

if TYPE_CHECKING:
    from lora_studio.core.report.inspect_report import InspectReport


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("inspect", help="show a base model and adapters: sizes, memory estimate, ranks, ΔW norms")
    add_base_argument(p)
    add_adapter_argument(p)
    p.add_argument("--dtype", choices=DTYPES, help="dtype for the memory estimate (default: the checkpoint's)")
    p.add_argument(
        "--device-map", default="cpu", help="cpu, cuda:N, mps or auto, for the memory estimate (default: cpu)"
    )
    add_quantize_argument(p, "estimate the memory of the base")
    add_max_memory_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lora_studio.core.report.inspect_report import inspect_base_and_adapters

    adapters = parse_adapter_specs(args.adapter)
    source = resolve_base(args)
    max_memory = max_memory_of(args)
    report = inspect_base_and_adapters(
        source, adapters, dtype=args.dtype, device_map=args.device_map, quantize=args.quantize
    )
    placement = None
    if max_memory is not None:
        from lora_studio.core.model.placement import plan_placement

        placement = plan_placement(source, report.estimate.dtype, max_memory)
    if args.json:
        print_json({**report.to_json(), "placement": placement.to_json() if placement else None})
    else:
        print(render(report))
        if placement is not None:
            for device, size in placement.bytes_per_device.items():
                layers = placement.to_json()["layers"].get(device, "")
                print(f"Placement  {device}: ~{human_bytes(size)} ({layers})")
    return 0


def render(report: InspectReport) -> str:
    b = report.estimate
    fp = b.footprint
    out = [
        f"Base       {report.source.label}",
        f"Path       {report.source.file}",
        f"Arch       {fp.architecture} ({fp.model_type})",
        f"Params     {fp.params:,}" + ("  (tied embeddings counted once)" if fp.tied_embeddings else ""),
        f"Checkpoint {fp.checkpoint_dtype}, {human_bytes(fp.checkpoint_bytes)} on disk",
        f"Memory     {b.dtype}{f' ({report.quantize})' if report.quantize else ''} on {b.device_map}: "
        f"~{human_bytes(b.needed_bytes)} -> "
        f"{b.verdict.replace('_', ' ')} ({b.explanation})",
    ]
    for a in report.adapters:
        out.append("")
        flags = [x for x, on in (("rsLoRA", a.use_rslora), ("DoRA", a.use_dora)) if on]
        pct = f" = {a.percent_of_base:.3f}% of base" if a.percent_of_base is not None else ""
        out.append(f"Adapter {a.name}  ({a.path})")
        out.append(f"  {a.peft_type} r={a.r} alpha={a.lora_alpha:g} scaling={a.scaling:.4g} {' '.join(flags)}".rstrip())
        out.append(
            f"  init: {a.init_lora_weights}; targets: {a.target_modules}; modules_to_save: {a.modules_to_save or '-'}"
        )
        if a.trainable_token_indices:
            out.append(f"  trainable tokens: {a.trainable_token_indices}")
        out.append(f"  params {a.params:,}{pct}; weights {a.weights_file} {human_bytes(a.weights_bytes)}")
        for w in a.warnings:
            out.append(f"  warning: {w}")
        rows = [
            [
                m.module,
                f"{m.in_features}x{m.out_features}",
                str(m.r),
                f"{m.delta_norm:.4g}",
                " ".join(f"{s:.3g}" for s in m.singular_values[:4]),
            ]
            for m in a.modules
        ]
        out.append(
            "  " + table(rows, ["module", "in x out", "r", "|ΔW|_F", "top singular values"]).replace("\n", "\n  ")
        )
    return "\n".join(out)
