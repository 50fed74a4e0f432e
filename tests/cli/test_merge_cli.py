"""``lora-studio merge``: exit codes, JSON output, bad input as one line."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_in_process


def run_cli(capsys, *argv):
    return run_in_process(capsys, argv)


def test_merge_json(tmp_path, capsys, tiny_llama, llama_adapters):
    out = tmp_path / "merged"
    code, stdout, err = run_cli(
        capsys,
        "merge",
        str(tiny_llama),
        "--adapter",
        f"a={llama_adapters['alpha']}",
        "--out",
        str(out),
        "--dtype",
        "bfloat16",
        "--no-verify",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["engine"] == "streaming" and doc["dtype"] == "bfloat16" and doc["verification"] is None
    assert (out / "model.safetensors").is_file() and "| a | 1 | 4 | 8 |" in (out / "README.md").read_text()


def test_merge_combination_text_output(tmp_path, capsys, tiny_llama, llama_adapters):
    out = tmp_path / "mix"
    code, stdout, err = run_cli(
        capsys,
        "merge",
        str(tiny_llama),
        "--adapter",
        str(llama_adapters["alpha"]),
        "--adapter",
        str(llama_adapters["beta"]),
        "--weights",
        "0.5,0.5",
        "--combination",
        "cat",
        "--out",
        str(out),
        "--no-verify",
    )
    assert code == 0, err
    assert "in-memory" in stdout and "skipped" in stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "1,2"], "--weights needs --combination"),
        (["--combination", "ties", "--weights", "0.5"], "1 values for 2 adapters"),
        (["--combination", "ties", "--weights", "a,b"], "not a comma-separated list"),
        (["--combination", "ties", "--weights", "0.5,0.5"], "needs a density"),
        (["--combination", "linear", "--weights", "0.5,0.5"], "same rank"),
    ],
)
def test_bad_combinations_exit_2(tmp_path, capsys, tiny_llama, llama_adapters, extra, message):
    code, stdout, err = run_cli(
        capsys,
        "merge",
        str(tiny_llama),
        "--adapter",
        str(llama_adapters["alpha"]),
        "--adapter",
        str(llama_adapters["beta"]),
        "--out",
        str(tmp_path / "o"),
        "--no-verify",
        *extra,
    )
    assert code == 2 and message in err and "Traceback" not in err and stdout == ""
    assert not (tmp_path / "o").exists()


def test_bad_input_exit_2(tmp_path, capsys, tiny_llama, llama_adapters):
    code, _, err = run_cli(capsys, "merge", str(tiny_llama), "--out", str(tmp_path / "o"))
    assert code == 2 and "no adapter" in err
    code, _, err = run_cli(
        capsys, "merge", str(tiny_llama), "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "merge", str(tiny_llama), "--adapter", str(llama_adapters["alpha"]))
    assert code == 2 and "--out" in err
    code, _, err = run_cli(
        capsys,
        "merge",
        str(tiny_llama),
        "--adapter",
        str(llama_adapters["alpha"]),
        "--out",
        str(tmp_path / "o"),
        "--dtype",
        "int8",
    )
    assert code == 2 and "invalid choice" in err
    (tmp_path / "o").mkdir()
    code, _, err = run_cli(
        capsys, "merge", str(tiny_llama), "--adapter", str(llama_adapters["alpha"]), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "already exists" in err and err.count("\n") == 1
