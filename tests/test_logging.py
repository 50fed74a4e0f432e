"""The log file: the CLI and the window write one in the data folder, rotating; LORA_STUDIO_DEBUG=1 logs more."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lora_studio.app_logging import LOG_NAME


def _cli(args, data, **env):
    full = dict(os.environ, LORA_STUDIO_DATA_DIR=str(data), **env)
    full.pop("LORA_STUDIO_LOG_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "lora_studio", *args], env=full, capture_output=True, text=True, timeout=120
    )


def test_cli_error_goes_to_the_log_file_in_the_data_folder(tmp_path):
    out = _cli(["inspect", str(tmp_path / "no-such-model")], tmp_path / "data")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1  # still one line on the terminal
    log = (tmp_path / "data" / "logs" / LOG_NAME).read_text()
    assert "cli inspect started" in log
    assert "no-such-model" in log


def test_help_names_the_log_file(tmp_path):
    out = _cli(["--help"], tmp_path / "data")
    assert out.returncode == 0
    assert str(tmp_path / "data" / "logs" / LOG_NAME) in " ".join(out.stdout.split()).replace("- ", "-")


def test_debug_raises_the_level(tmp_path):
    code = (
        "import logging; from lora_studio.app_logging import setup_logging; p = setup_logging('t'); "
        "logging.getLogger('lora_studio.x').debug('deep detail'); print(p)"
    )
    for debug, expected in (("1", True), ("", False)):
        env = dict(os.environ, LORA_STUDIO_DATA_DIR=str(tmp_path / f"d{debug}"), LORA_STUDIO_DEBUG=debug)
        env.pop("LORA_STUDIO_LOG_DIR", None)
        path = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
        assert ("deep detail" in Path(path).read_text()) is expected


def test_log_panel_shows_the_file_and_logs_its_lines(qtbot, caplog):
    from lora_studio.gui.docks.log import LogPanel

    panel = LogPanel()
    qtbot.addWidget(panel)
    panel.show_log_file("/some/where/lora-studio.log")
    assert "/some/where/lora-studio.log" in panel.log_file.text()
    with caplog.at_level("INFO", logger="lora_studio"):
        panel.log("merged pirate", "error", "the detail")
    assert any("merged pirate" in r.getMessage() and "the detail" in r.getMessage() for r in caplog.records)


def test_a_librarys_own_warning_goes_to_the_file_not_the_terminal(tmp_path):
    # bitsandbytes warns at import (PEFT imports it) on a CPU without its optional kernels package
    code = (
        "import logging; from lora_studio.app_logging import setup_logging; p = setup_logging('t'); "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('optional kernels missing'); print(p)"
    )
    env = dict(os.environ, LORA_STUDIO_DATA_DIR=str(tmp_path / "d"))
    env.pop("LORA_STUDIO_LOG_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stderr == ""
    assert "optional kernels missing" in Path(out.stdout.strip()).read_text()
