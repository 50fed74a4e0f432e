"""``lora-studio export``: JSON output, the human summary, bad input as one line with exit 2."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_in_process

pytest.importorskip("llama_cpp", reason="llama.cpp's binding is installed by `make test`")


def test_export_json_is_one_verified_object(tmp_path, capsys, gguf_llama, gguf_llama_adapters):
    out = tmp_path / "m.q8_0.gguf"
    code, stdout, err = run_in_process(
        capsys, ["export", gguf_llama, "--adapter", f"a={gguf_llama_adapters['alpha']}", "--out", out, "--json"]
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["type"] == "q8_0" and doc["format"] == "gguf" and doc["bytes"] == out.stat().st_size
    assert doc["verification"]["status"] in ("pass", "warn") and doc["verification"]["template"]["status"] == "pass"
    assert set(doc["bundle"]["commands"]) >= {"llama-server", "ollama", "vllm"}
    assert (tmp_path / "m.q8_0.gguf.serve" / "Modelfile").is_file()


def test_export_text_names_the_file_the_badge_and_the_commands(tmp_path, capsys, gguf_llama, gguf_llama_adapters):
    out = tmp_path / "a.gguf"
    code, stdout, err = run_in_process(
        capsys, ["export", gguf_llama, "--adapter", gguf_llama_adapters["beta"], "--format", "gguf-lora", "--out", out]
    )
    assert code == 0, err
    assert f"Saved     {out}" in stdout and "Verified  " in stdout and "llama-server: llama-server -m" in stdout
    assert "--lora" in stdout


def test_export_plan_and_no_verify(tmp_path, capsys, gguf_llama, gguf_llama_adapters):
    code, stdout, _ = run_in_process(
        capsys,
        ["export", gguf_llama, "--adapter", gguf_llama_adapters["alpha"], "--out", tmp_path / "p.gguf", "--plan"],
    )
    assert code == 0 and "q8_0 GGUF of about" in stdout and not (tmp_path / "p.gguf").exists()
    code, stdout, _ = run_in_process(
        capsys,
        ["export", gguf_llama, "--type", "f16", "--out", tmp_path / "b.gguf", "--no-verify", "--json"],
    )
    assert code == 0 and json.loads(stdout)["verification"]["status"] == "skipped"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--out", "m.gguf", "--type", "q9_9"], "invalid choice"),
        (["--out", "m.gguf", "--format", "gguf-lora"], "needs an adapter"),
        (["--out", "m.bin"], "does not end in .gguf"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, gguf_llama, args, words):
    args = [str(tmp_path / a) if a.startswith("m.") else a for a in args]
    code, _, err = run_in_process(capsys, ["export", gguf_llama, *args])
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_architectures_lists_what_llama_cpps_converter_exports(capsys):
    code, stdout, _ = run_in_process(capsys, ["export", "--architectures", "--json"])
    doc = json.loads(stdout)
    assert code == 0 and doc["llama_cpp_python"] == "0.3.36"
    assert {"LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"} <= set(doc["architectures"])


def test_an_existing_output_needs_overwrite(tmp_path, capsys, gguf_llama):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    code, _, err = run_in_process(capsys, ["export", gguf_llama, "--out", out, "--no-verify"])
    assert code == 2 and "already exists" in err and out.read_bytes() == b"keep me"
