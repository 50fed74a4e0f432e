"""``lora-studio export BASE [--adapter PATH] --format gguf|gguf-lora|mlx|peft [--type TYPE] --out FILE|DIR``.

A GGUF for llama.cpp / Ollama, verified in llama.cpp, with a serving bundle beside it; or an adapter for mlx-lm
(``mlx``), or a PEFT adapter from an mlx-lm one (``peft``), each a folder checked in mlx-lm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_studio.cli.common import (
    SubParsers,
    add_adapter_argument,
    add_base_argument,
    add_merge_into_argument,
    add_quantize_argument,
    human_bytes,
    output_path,
    parse_adapter_specs,
    print_json,
    resolve_base,
    stderr_progress,
)
from lora_studio.core.errors import UserError


def add_parser(sub: SubParsers) -> None:
    from lora_studio.core.export import DEFAULT_TYPE, FORMATS, OUTPUT_TYPES

    p = sub.add_parser(
        "export", help="export a GGUF (merged, or the adapter alone) verified in llama.cpp, or an adapter for mlx-lm"
    )
    add_base_argument(p)
    add_adapter_argument(p, "adapter folder, optionally NAME=PATH (without it, --format gguf exports the base)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="gguf",
        help="gguf: merged model; gguf-lora: adapter alone; mlx: the adapter for mlx-lm (a folder); peft: an mlx-lm "
        "adapter as a PEFT folder",
    )
    p.add_argument(
        "--type",
        choices=list(OUTPUT_TYPES),
        metavar="TYPE",
        help=f"{', '.join(OUTPUT_TYPES)} (default {DEFAULT_TYPE}; f16 for gguf-lora)",
    )
    p.add_argument("--out", help="output .gguf file, or folder for mlx / peft (must not exist unless --overwrite)")
    p.add_argument(
        "--base-gguf", help="gguf-lora: the base GGUF to verify the adapter on (default: an f16 one, temporary)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip running the file in llama.cpp")
    p.add_argument(
        "--serve-gpu",
        type=float,
        default=None,
        metavar="GIB",
        help="the GPU's memory (GiB) the bundle's vLLM plan fits adapter slots on (default 24)",
    )
    add_quantize_argument(p, "merge a QLoRA adapter as it learned on the base (default: its lora_studio.json record),")
    add_merge_into_argument(
        p,
        "for such an adapter: add its update to the checkpoint's weights (original), to the dequantised ones it "
        "learned on (dequantized), or to the closer of the two, measured (auto, the default)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (atomically, at the end)")
    p.add_argument(
        "--plan",
        action="store_true",
        help="only print what the export to --out needs (size, memory, the disk there); write nothing",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--architectures", action="store_true", help="only list the architectures llama.cpp's converter exports"
    )
    p.set_defaults(run=run)


def list_architectures(as_json: bool) -> int:
    from lora_studio.core.export.converter import PINNED_VERSION, require_converter, text_architectures

    require_converter()
    names = text_architectures()
    if as_json:
        print_json({"llama_cpp_python": PINNED_VERSION, "architectures": names})
    else:
        print(f"llama.cpp's converter (llama-cpp-python {PINNED_VERSION}) exports {len(names)} architectures:")
        print("\n".join(names))
    return 0


def run(args: argparse.Namespace) -> int:
    from lora_studio.core.export import MLX_FORMATS, ExportRequest, export_gguf, plan_export
    from lora_studio.core.model.sources import check_gguf_file

    if args.architectures:
        return list_architectures(args.json)
    if not args.out:
        raise UserError("no output file given", "pass --out FILE.gguf")
    specs = parse_adapter_specs(args.adapter)
    if len(specs) > 1:
        raise UserError("export takes one adapter", "combine several with `lora-studio merge --adapter-only` first")
    name, adapter = specs[0] if specs else (None, None)
    out = output_path(args.out)
    if args.format in MLX_FORMATS:
        if args.type not in (None, "f32") or args.base_gguf or args.quantize or args.merge_into:
            raise UserError(
                f"--format {args.format} writes the adapter's factors as they are",
                "drop --type, --base-gguf, --quantize and --merge-into",
            )
    elif out.suffix.lower() != ".gguf":
        raise UserError(f"{out.name} does not end in .gguf", "name the output file like model.q8_0.gguf")
    base_gguf = Path(args.base_gguf).expanduser() if args.base_gguf else None
    if args.serve_gpu is not None and not 1 <= args.serve_gpu <= 4096:
        raise UserError(f"--serve-gpu {args.serve_gpu:g} is not a GPU's memory in GiB", "give 1 to 4096, e.g. 24")
    if base_gguf is not None:
        if args.format != "gguf-lora":
            raise UserError("--base-gguf is the base of an adapter-only GGUF", "add --format gguf-lora, or drop it")
        check_gguf_file(base_gguf, "base GGUF")
    progress = stderr_progress()
    source = resolve_base(args, report=progress)
    request = ExportRequest(
        source,
        out,
        args.format,
        args.type,
        adapter=adapter,
        adapter_name=name,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        base_gguf=base_gguf,
        quantize=args.quantize,
        merge_into=args.merge_into,
        **({"serve_gpu_gib": args.serve_gpu} if args.serve_gpu is not None else {}),
    )
    if args.plan:
        plan = plan_export(request)
        if plan.refusal:
            raise UserError(plan.refusal, plan.hint)
        if args.json:
            print_json(plan.to_json())
        else:
            print(plan.summary())
        return 0
    try:
        result = export_gguf(request, report=progress)
    finally:
        progress.done()
    v = result.verification
    if args.json:
        print_json(result.to_json())
    else:
        print(f"Saved     {result.out}")
        size = human_bytes(result.bytes_written)
        print(f"Format    {result.format}, {result.type}, {size} in {result.seconds:.1f} s")
        print(f"Verified  {v.summary()}")
        if result.carried is not None:
            print(f"Carried   {result.carried.summary()}")
        if result.bundle is not None:
            files = "README.md" if result.format in MLX_FORMATS else "Modelfile, README.md"
            print(f"Serving   {result.bundle.folder}/ ({files})")
            for label, line in result.bundle.commands.items():
                print(f"  {label}: {line}")
    # on stderr with --json too: a script reading the JSON still sees it
    if v.status in ("warn", "fail"):
        sys.stderr.write(f"lora-studio: warning: verification {v.status}: {v.reason}\n")
    if result.carried is not None and result.carried.status == "washed out":
        sys.stderr.write(f"lora-studio: warning: {result.carried.summary()}\n")
    return 0
