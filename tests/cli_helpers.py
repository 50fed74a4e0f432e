"""Running the CLI in-process for a test, exit code included; reading the serving commands an export prints."""

from __future__ import annotations

import itertools
import shlex

from lora_studio.cli.main import main

LLAMA_ARGS = {"-m": "model_path", "--model": "model_path", "--lora": "lora_path", "--lora_path": "lora_path"}


def run_in_process(capsys, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lora-studio ARGV``; argparse's usage errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def llama_arguments(command: str) -> dict[str, str]:
    """What a bundle's llama-server / llama_cpp.server line hands llama.cpp: the model and the LoRA, by flag."""
    words = shlex.split(command)
    return {LLAMA_ARGS[flag]: value for flag, value in itertools.pairwise(words) if flag in LLAMA_ARGS}
