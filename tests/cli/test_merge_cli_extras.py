"""``lora-studio merge``: progress in MiB and %, and ``--adapter-only`` (a combination saved as an adapter folder)."""

from __future__ import annotations

import io
import json

import pytest
from cli_helpers import run_in_process

from lora_studio.cli import common
from lora_studio.core.tasks import Progress


def test_progress_text_reads_in_mib_and_percent():
    p = Progress(3 * 1024**2 + 512 * 1024, 270 * 1024**2, "merging tensor 12/272", "bytes")
    assert common.progress_text(p) == "merging tensor 12/272 · 3.5 / 270.0 MiB (1 %)"
    big = Progress(1536 * 1024**2, 3072 * 1024**2, "merging tensor 100/200", "bytes")
    assert common.progress_text(big) == "merging tensor 100/200 · 1,536.0 / 3,072.0 MiB (50 %)"
    assert (
        common.progress_text(Progress(1, 2, "verifying: prompt 1/2", "steps"))
        == "verifying: prompt 1/2 (50 %)"  # a message that says its count gets no second one
    )
    assert common.progress_text(Progress(0, None, "loading")) == "loading…"
    assert common.progress_text(Progress(0, 0, "loading")) == "loading…"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stderr_progress_writes_one_clipped_line(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(common.sys, "stderr", term)
    monkeypatch.setattr(common.shutil, "get_terminal_size", lambda fallback: __import__("os").terminal_size((40, 24)))
    progress = common.stderr_progress()
    progress(Progress(10 * 1024**2, 20 * 1024**2, "merging tensor 1/2", "bytes"))
    line = term.getvalue().split("\r\033[K")[-1]
    assert len(line) <= 39 and line.startswith("merging tensor 1/2 · 10.0 / 20.0") and line.endswith("…")
    assert "10485760" not in term.getvalue()  # no raw byte counts
    progress.done()
    assert term.getvalue().endswith("\r\033[K")


def test_adapter_only_saves_a_peft_adapter(tmp_path, capsys, tiny_llama, llama_adapters):
    out = tmp_path / "mix-adapter"
    argv = [
        "merge",
        tiny_llama,
        "--adapter",
        f"a={llama_adapters['alpha']}",
        "--adapter",
        f"b={llama_adapters['beta']}",
    ]
    code, stdout, err = run_in_process(
        capsys, [*argv, "--combination", "cat", "--weights", "0.7,0.3", "--out", out, "--adapter-only", "--json"]
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["rank"] == 12 and doc["combination"] == "cat" and "adapter_model.safetensors" in doc["files"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 12
    assert not (out / "model.safetensors").exists()  # nothing merged

    code, stdout, err = run_in_process(
        capsys, [*argv, "--combination", "linear", "--out", tmp_path / "lin", "--adapter-only"]
    )
    assert code == 2 and "same rank" in err and not (tmp_path / "lin").exists()


@pytest.mark.parametrize(
    "extra, message",
    [([], "saves a combination"), (["--combination", "cat", "--engine", "streaming"], "--engine applies to a merge")],
)
def test_adapter_only_bad_requests(tmp_path, capsys, tiny_llama, llama_adapters, extra, message):
    argv = ["merge", tiny_llama, "--adapter", llama_adapters["alpha"], "--adapter", llama_adapters["beta"]]
    code, _, err = run_in_process(capsys, [*argv, "--out", tmp_path / "o", "--adapter-only", *extra])
    assert code == 2 and message in err and len(err.strip().splitlines()) <= 2
