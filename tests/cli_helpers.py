"""Running the CLI in-process for a test, exit code included."""

from __future__ import annotations

from lora_studio.cli.main import main


def run_in_process(capsys, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lora-studio ARGV``; argparse's usage errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
