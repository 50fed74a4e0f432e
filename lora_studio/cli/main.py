"""Entry point and the CLI's error policy.

Exit codes everywhere: 0 ok; 2 bad input (one clear line on stderr, no traceback);
1 internal error (one line; the traceback only with LORA_STUDIO_DEBUG=1); 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from lora_studio import __version__
from lora_studio.app_logging import setup_logging
from lora_studio.core.errors import describe

if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from types import FrameType
    from typing import Any, TypeAlias

    # what signal.signal returns and takes: a handler, SIG_DFL / SIG_IGN, or None (set outside Python)
    _SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any] | int | None

logger = logging.getLogger(__name__)
EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        # every bad input starts the same way, a subcommand's own usage errors included
        sys.stderr.write(f"lora-studio: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from lora_studio.app_logging import DEBUG_ENV, log_path
    from lora_studio.cli import compare_cmd, evaluate_cmd, export_cmd, inspect_cmd, merge_cmd, reduce_cmd, train_cmd

    parser = _OneLineParser(
        prog="lora-studio",
        description="Load a base model, attach, compare, merge, train, export, evaluate and reduce LoRA adapters.",
        # where the log goes, without creating its folder: a home that is not a folder is the command's to say
        epilog=f"Log file: {log_path(create=False)} (rotating; {DEBUG_ENV}=1 logs more and shows tracebacks).",
    )
    parser.add_argument("--version", action="version", version=f"lora-studio {__version__}")
    parser.add_argument("--demo", action="store_true", help="open the window with the embedded demo model loaded")
    parser.add_argument("--open", dest="base", metavar="PATH", help="open the window with this base model loaded")
    sub = parser.add_subparsers(
        dest="command", parser_class=_OneLineParser, metavar="{inspect,compare,merge,train,export,evaluate,reduce}"
    )
    for module in (inspect_cmd, compare_cmd, merge_cmd, train_cmd, export_cmd, evaluate_cmd, reduce_cmd):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lora_studio.core.model.loading import offline_environment
    from lora_studio.core.system.allocator import limit_malloc_arenas

    limit_malloc_arenas()  # before the libraries start their threads
    offline_environment()
    if not os.environ.get("LORA_STUDIO_DEBUG"):
        import warnings

        # Deprecation notices and library chatter (torch, transformers, PEFT) are for their developers, not for our
        # users: a bad input is one line on stderr. LORA_STUDIO_DEBUG=1 shows everything.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # the libraries' own progress bars (llama.cpp's GGUF writer, transformers' save): ours is on stderr already.
        # Read when tqdm and huggingface_hub are imported, which is after this.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for stream in (sys.stdout, sys.stderr):
        # File names need not be UTF-8 on Linux; escape what cannot be encoded instead of failing.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is not None:
        setup_logging(f"cli {args.command}")
    if args.command is None:
        return _open_window(args)
    previous = _interrupt_on_termination()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("lora-studio: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place the CLI turns errors into words
        desc = describe(exc)
        logger.log(
            logging.INFO if desc.kind in ("user", "cancelled") else logging.ERROR,
            "%s: %s\n%s",
            args.command,
            desc.message,
            desc.detail,
        )
        if os.environ.get("LORA_STUDIO_DEBUG"):
            sys.stderr.write(desc.detail)
        if desc.kind == "cancelled":
            sys.stderr.write("lora-studio: cancelled\n")
            return EXIT_INTERRUPTED
        if desc.kind in ("user", "oom"):
            sys.stderr.write(f"lora-studio: error: {desc.message}\n")
            return EXIT_BAD_INPUT
        sys.stderr.write(f"lora-studio: {desc.message} (set LORA_STUDIO_DEBUG=1 for the traceback)\n")
        return EXIT_INTERNAL
    finally:
        import signal

        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt_on_termination() -> dict[signal.Signals, _SignalHandler]:
    """SIGTERM and SIGHUP end a command the way Ctrl-C does: its outputs' temporary siblings are removed on the way
    out (the default action would kill the process and leave them for the next run to clean)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set from the main thread (an in-process test runner, say)

    def interrupt(signum: int, _frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _open_window(args: argparse.Namespace) -> int:
    if sys.platform.startswith("linux") and not any(
        os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    ):
        # Qt would abort the process (SIGABRT) after five lines of its own
        sys.stderr.write(
            "lora-studio: error: no display to open the window on (DISPLAY is not set); the CLI works without one: "
            "try `lora-studio inspect --demo`\n"
        )
        return EXIT_BAD_INPUT
    if args.base and not os.path.exists(os.path.expanduser(args.base)) and args.base.count("/") != 1:
        sys.stderr.write(f"lora-studio: error: {args.base} does not exist (check the path given to --open)\n")
        return EXIT_BAD_INPUT
    try:
        from lora_studio.gui.window.app import run_app
    except ImportError as exc:  # e.g. PySide6 missing or no Qt platform libraries
        sys.stderr.write(
            f"lora-studio: the window cannot start ({exc}); the CLI works: try `lora-studio inspect --demo`\n"
        )
        return EXIT_INTERNAL
    return run_app(demo=args.demo, base=args.base)


if __name__ == "__main__":
    raise SystemExit(main())
