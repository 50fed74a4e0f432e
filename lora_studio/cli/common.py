"""Pieces the subcommands share: base/adapter arguments, progress on stderr, output."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lora_studio.core.errors import UserError
from lora_studio.core.system.memory import format_bytes
from lora_studio.core.tasks import Progress, Report

if TYPE_CHECKING:
    from lora_studio.core.model.placement import MaxMemory
    from lora_studio.core.model.sources import ModelSource
    from lora_studio.core.session import Session


class SubParsers(Protocol):
    """What a subcommand module's ``add_parser(sub)`` gets: ``ArgumentParser.add_subparsers()``'s action."""

    def add_parser(self, name: str, *, help: str | None = ...) -> argparse.ArgumentParser: ...


def add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "base", nargs="?", help="model folder, .gguf file, or a repo id in the local Hugging Face cache"
    )
    parser.add_argument("--demo", action="store_true", help="use the embedded demo model (SmolLM2-135M-Instruct)")


def add_quantize_argument(parser: argparse.ArgumentParser, purpose: str = "load the base") -> None:
    from lora_studio.core.model.quantize import QUANTIZE_CHOICES

    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help=f"{purpose} with its linear weights in 4 bits (nf4, fp4) or 8 (int8), through bitsandbytes",
    )


def add_max_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-memory",
        metavar="DEV=SIZE,...",
        help="each device's limit, e.g. cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB: accelerate places the layers, "
        "what is left goes to disk",
    )


def max_memory_of(args: argparse.Namespace) -> MaxMemory | None:
    """``--max-memory`` parsed (a UserError, exit 2, when it is wrong)."""
    from lora_studio.core.model.placement import parse_max_memory

    text = getattr(args, "max_memory", None)
    return parse_max_memory(text) if text is not None else None


def load_base(session: Session, source: ModelSource, args: argparse.Namespace, report: Report) -> None:
    """``session.load`` as the command's options ask (dtype, device map, quantisation, memory limits), then where
    the layers went on stderr when accelerate placed them."""
    session.load(
        source,
        dtype=args.dtype,
        device_map=getattr(args, "device_map", "cpu"),
        quantize=args.quantize,
        max_memory=max_memory_of(args),
        report=report,
    )
    placed = session.placement()
    if placed:
        line = "; ".join(f"{device}: {modules}" for device, modules in placed.items())
        sys.stderr.write(f"lora-studio: placed {line}\n")


def add_merge_into_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--merge-into", choices=("auto", "original", "dequantized"), help=help_text)


def add_adapter_argument(
    parser: argparse.ArgumentParser, help_text: str = "adapter folder, optionally named: NAME=PATH (repeatable)"
) -> None:
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH", help=help_text)


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` or ``PATH`` (named after the folder); names must be unique."""
    from lora_studio.core.adapters.mlx_format import as_peft_folder
    from lora_studio.core.session import adapter_name_for

    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or ("/" in name or "\\" in name) or not name:
            name, path = "", spec
        path_obj = Path(path).expanduser()
        name = name or adapter_name_for(path_obj)
        if any(n == name for n, _ in out):
            raise UserError(f"two adapters are named {name!r}", "give each a unique name with NAME=PATH")
        # an mlx-lm adapter folder goes in as its PEFT conversion (made once), as the window attaches it
        path_obj, converted = as_peft_folder(path_obj)
        if converted:
            sys.stderr.write(f"lora-studio: {name}: {converted}\n")
        out.append((name, path_obj))
    return out


def resolve_base(args: argparse.Namespace, *, report: Report | None = None) -> ModelSource:
    from lora_studio.core.demo import model as demo
    from lora_studio.core.model.sources import resolve_source

    if getattr(args, "demo", False):
        if args.base:
            raise UserError("give either a base model or --demo, not both", "drop one of them")
        return demo.ensure_demo_model(report=report or stderr_progress())
    if not args.base:
        raise UserError("no base model given", "pass a model folder, a .gguf file, a cached repo id, or --demo")
    return resolve_source(args.base)


def base_path(args: argparse.Namespace) -> Path | None:
    """The base named on the command line as a path, when it is one (not a repo id of the Hugging Face cache)."""
    base = getattr(args, "base", None)
    if not base or getattr(args, "demo", False):
        return None
    path = Path(base).expanduser()
    return path if path.exists() else None


def output_path(text: str, option: str = "--out") -> Path:
    """``--out`` as a path; an empty one is bad input (``Path("")`` would silently mean the current folder)."""
    if not text.strip():
        raise UserError(f"{option} is empty", "give the output's name")
    return Path(text).expanduser()


def comma_list(text: str, option: str) -> list[str]:
    """``a,b,c`` as its stripped items; an empty item inside (``a,,b``) is a typo, refused, not skipped (a trailing
    comma is let through)."""
    items = [item.strip() for item in text.split(",")]
    if items and not items[-1]:
        items.pop()
    if not items or not all(items):
        raise UserError(f"{option} {text!r} has an empty item", f"write it like {option} a,b")
    return items


def check_report_path(text: str, *, overwrite: bool, inputs: dict[str, Path | None]) -> Path:
    """``--report FILE``, checked before any work: a known type, apart from every input of the command (``inputs``:
    the base, adapters, data and prompts files), and not an existing file without --overwrite."""
    from lora_studio.core.io.paths import check_output_apart
    from lora_studio.core.report.share import report_kind

    path = output_path(text, "--report")
    report_kind(path)
    check_output_apart(path, inputs)
    if path.is_dir():  # said now, not after the work the report is for
        raise UserError(f"{path} is a folder", "give the report a file name, like report.html")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists", "choose another --report file or add --overwrite")
    return path


MIB = 1024**2


def progress_text(p: Progress) -> str:
    """One progress line for people: bytes as MiB with the percentage, other counts as done/total unit (%)."""
    total = p.total  # no total (None or 0): no fraction, just the message
    if not total:
        return f"{p.message}…"
    percent = f"{max(0.0, min(1.0, p.done / total)) * 100:.0f} %"
    if p.unit == "bytes":
        return f"{p.message} · {p.done / MIB:,.1f} / {total / MIB:,.1f} MiB ({percent})"
    if p.counted:
        return f"{p.message} ({percent})"
    unit = f" {p.unit}" if p.unit else ""
    return f"{p.message} · {int(p.done)}/{int(total)}{unit} ({percent})"


class stderr_progress:
    """Progress on stderr. On a terminal: one line, rewritten in place. Otherwise (a log file, a pipe, a job on a
    cluster): plain lines, a new stage at once and the same stage every half minute, once the command has run
    ten seconds (a quick command, or a refusal, still writes nothing but its own line)."""

    QUIET_S = 10.0  # nothing is logged before this
    SAME_STAGE_EVERY_S = 30.0
    NEW_STAGE_EVERY_S = 2.0  # stages that change with every report (a name in the message) are logged this often

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = ""
        self._started = time.monotonic()
        self._logged_at = float("-inf")
        self._logged_stage: str | None = None

    def __call__(self, p: Progress) -> None:
        if not self._tty:
            self._log_line(p)
            return
        # a line wider than the terminal wraps, and "\r" then rewrites only its last part
        width = shutil.get_terminal_size((100, 24)).columns - 1
        text = progress_text(p)
        text = text if len(text) <= width else text[: max(width - 1, 1)] + "…"
        if text != self._last:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
            self._last = text

    def _log_line(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._started < self.QUIET_S:
            return
        since = now - self._logged_at
        new_stage = p.stage != self._logged_stage
        if since >= self.SAME_STAGE_EVERY_S or (new_stage and since >= self.NEW_STAGE_EVERY_S):
            sys.stderr.write(progress_text(p) + "\n")
            sys.stderr.flush()
            self._logged_at, self._logged_stage = now, p.stage

    def done(self) -> None:
        if self._tty and self._last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def print_json(obj: object) -> None:
    """One JSON object on stdout; NaN and Infinity (not JSON) are written as null."""
    sys.stdout.write(json.dumps(_finite(obj), indent=None, default=str, allow_nan=False) + "\n")


def _finite(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def human_bytes(n: float | None) -> str:
    """Bytes for people, as the window shows them; '?' when unknown."""
    return "?" if n is None else format_bytes(n)


def table(rows: list[list[str]], headers: list[str]) -> str:
    if rows:
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    else:
        widths = [len(h) for h in headers]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
