"""``lora-studio train BASE --data FILE [--val FILE] [--r 8 ...] --out DIR [--resume CKPT] [--json]``.

Train a LoRA adapter with TRL's SFTTrainer on local data. Progress on stderr; Ctrl+C once stops after the
current step and writes a checkpoint to resume from (twice: stop at once).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.cli.common import (
    SubParsers,
    add_base_argument,
    add_quantize_argument,
    comma_list,
    output_path,
    print_json,
    resolve_base,
    stderr_progress,
)
from lora_studio.core.errors import Cancelled
from lora_studio.core.tasks import CancelToken

if TYPE_CHECKING:
    from types import FrameType

    from lora_studio.core.train import TrainRequest, TrainSettings


def add_parser(sub: SubParsers) -> None:
    from lora_studio.core.model.dtypes import DTYPES
    from lora_studio.core.train import ADVICE, INIT_METHODS, SCHEDULERS, TrainSettings

    d = TrainSettings()
    p = sub.add_parser("train", help="train a LoRA adapter on local data (TRL SFTTrainer)")
    add_base_argument(p)
    p.add_argument("--data", required=True, help="training data: .jsonl/.json/.csv/.parquet or a save_to_disk folder")
    p.add_argument("--val", help="validation data (default: hold out --val-fraction of --data)")
    p.add_argument("--out", required=True, help="adapter folder to write (must not exist unless --overwrite)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint-N folder of an earlier run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.add_argument("--r", type=int, default=d.r, help=ADVICE["r"])
    p.add_argument("--alpha", type=float, default=d.alpha, help=ADVICE["alpha"])
    p.add_argument("--dropout", type=float, default=d.dropout, help=ADVICE["dropout"])
    p.add_argument(
        "--targets",
        default=",".join(d.targets),
        help="attention, all-linear, or comma-separated module names (" + ADVICE["targets"] + ")",
    )
    p.add_argument("--init", choices=INIT_METHODS, default=d.init, help=ADVICE["init"])
    p.add_argument("--rslora", action="store_true", help=ADVICE["rslora"])
    p.add_argument("--dora", action="store_true", help=ADVICE["dora"])
    p.add_argument("--lr", type=float, default=d.learning_rate, help=ADVICE["learning_rate"])
    p.add_argument("--epochs", type=float, default=d.epochs, help=ADVICE["epochs"])
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=ADVICE["max_steps"])
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=ADVICE["batch_size"])
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help=ADVICE["grad_accum"])
    p.add_argument("--max-length", type=int, default=d.max_length, help=ADVICE["max_length"])
    p.add_argument("--warmup", type=float, default=d.warmup_ratio, help=ADVICE["warmup_ratio"])
    p.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help=ADVICE["scheduler"])
    p.add_argument("--seed", type=int, default=d.seed, help=ADVICE["seed"])
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help=ADVICE["eval_steps"])
    p.add_argument("--save-steps", type=int, default=d.save_steps, help=ADVICE["save_steps"])
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help=ADVICE["val_fraction"])
    p.add_argument("--whole-text-loss", action="store_true", help="compute the loss on prompts too")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="dtype to train in (float32 on the CPU)")
    p.add_argument("--device", default=d.device, help="cpu or cuda:N")
    add_quantize_argument(p, "QLoRA: train on the base")
    p.add_argument(
        "--keep", choices=("best", "last"), default=d.keep, help="save the best (by validation loss) or last"
    )
    p.add_argument("--baseline", action="store_true", help="also run a full fine-tuning baseline (models <= 500 M)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.add_argument(
        "--export-script",
        metavar="DIR",
        help="write a standalone script + accelerate configs (DDP, FSDP) for this run into DIR instead of training",
    )
    p.add_argument("--gpus", type=int, default=2, help="processes in the exported accelerate configs (one per GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> TrainSettings:
    from lora_studio.core.train import TrainSettings

    return TrainSettings(
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(comma_list(args.targets, "--targets")),
        init=args.init,
        rslora=args.rslora,
        dora=args.dora,
        learning_rate=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        warmup_ratio=args.warmup,
        scheduler=args.scheduler,
        seed=args.seed,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        val_fraction=args.val_fraction,
        completion_only=not args.whole_text_loss,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        keep=args.keep,
        baseline=args.baseline,
    )


def run(args: argparse.Namespace) -> int:
    from lora_studio.core.train import TrainRequest, train_adapter

    settings = settings_from(args)
    settings.check()
    progress = stderr_progress()
    source = resolve_base(args, report=progress)
    request = TrainRequest(
        source,
        Path(args.data).expanduser(),
        output_path(args.out),
        settings,
        val_file=Path(args.val).expanduser() if args.val else None,
        resume=Path(args.resume).expanduser() if args.resume else None,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    if args.export_script is not None:  # "" too: an empty folder name is bad input, not "no script"
        return _export(args, request)
    cancel = CancelToken()
    previous = signal.getsignal(signal.SIGINT)

    # first Ctrl+C: stop after this step, with a checkpoint; second: now
    def stop(_signum: int, _frame: FrameType | None) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        sys.stderr.write("\nlora-studio: stopping after this step (Ctrl+C again to stop at once)\n")

    signal.signal(signal.SIGINT, stop)
    try:
        result = train_adapter(request, cancel=cancel, report=progress)
    except Cancelled as exc:
        stopped: Cancelled | None = exc
    else:
        stopped = None
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.done()
    if stopped is not None:
        sys.stderr.write(f"lora-studio: {stopped}\n")
        return 130
    if args.json:
        print_json(result.to_json())
        return 0
    lora = result.lora
    print(f"Saved       {result.adapter}  ({result.kept} weights, step {result.kept_step})")
    print(f"Data        {result.data_summary}")
    print(
        f"Loss        train {_f(lora.last_train_loss)}, validation {_f(lora.last_val_loss)}, "
        f"best validation {_f(lora.best_val_loss)} (step {lora.best_step})"
    )
    print(f"Time        {lora.seconds:.1f} s, {lora.steps} steps, checkpoints in {result.checkpoints}")
    other = result.alternative
    if other is not None:
        print(
            f"Other       the {other.kind} weights (step {other.step}, validation {_f(other.val_loss)}) "
            f"are saved too, in {other.path}"
        )
    if result.baseline is not None:
        b = result.baseline
        print(
            f"Baseline    full fine-tuning: best validation {_f(b.best_val_loss)}, {b.seconds:.1f} s, "
            f"{b.trainable_params:,} trainable parameters vs {lora.trainable_params:,}"
        )
    for warning in result.warnings:
        sys.stderr.write(f"lora-studio: warning: {warning}\n")
    return 0


def _export(args: argparse.Namespace, request: TrainRequest) -> int:
    from lora_studio.core.errors import UserError
    from lora_studio.core.train.script import export_script

    if not args.export_script.strip():
        raise UserError("--export-script is empty", "name the folder to write the script into")
    exported = export_script(request, Path(args.export_script), gpus=args.gpus, overwrite=args.overwrite)
    if args.json:
        print_json(exported.to_json())
        return 0
    print(f"Wrote       {exported.script}")
    for config in exported.configs:
        print(f"            {config}")
    print(f"Run it      accelerate launch --config_file {exported.configs[0]} {exported.script}")
    return 0


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
