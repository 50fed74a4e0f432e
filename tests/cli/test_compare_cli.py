"""`lora-studio compare` as a user runs it: JSON shape, human sections, prompts files, exit 2 on bad input."""

import json
import subprocess
import sys

import pytest
from cli_helpers import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_json_shape(tiny_llama, llama_adapters, capsys):
    code, out, err = run_in_process(
        capsys,
        [
            "compare",
            tiny_llama,
            "--adapter",
            f"alpha={llama_adapters['alpha']}",
            "--adapter",
            f"beta={llama_adapters['beta']}",
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "8",
            "--json",
        ],
    )
    assert code == 0, err
    assert out.count("\n") == 1
    obj = json.loads(out)
    assert set(obj) >= {"prompt", "variants", "mixed_batch", "seconds"}
    assert obj["prompt"] == "hello world" and obj["mixed_batch"] is True and obj["fallback_reason"] is None
    assert [v["name"] for v in obj["variants"]] == ["base", "alpha", "beta"]
    for v in obj["variants"]:
        assert set(v) >= {"name", "text", "token_ids"} and isinstance(v["text"], str)
        assert 1 <= len(v["token_ids"]) <= 8
    assert isinstance(obj["seconds"], float)
    cols = {c["name"]: c for c in obj["divergence"]["columns"]}
    assert obj["divergence"]["reference"] == "base" and cols["base"]["first_divergence"] is None
    assert 0 <= cols["alpha"]["agreement"] <= 100 and len(cols["alpha"]["kl"]) == len(obj["variants"][0]["token_ids"])


def test_compare_without_base_from_prompts_file_human(tiny_llama, llama_adapters, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fox"}\n\n{"prompt": "Paris is"}\n')
    code, out, err = run_in_process(
        capsys,
        [
            "compare",
            tiny_llama,
            "--no-base-variant",
            "--adapter",
            f"alpha={llama_adapters['alpha']}",
            "--adapter",
            f"beta={llama_adapters['beta']}",
            "--prompts-file",
            prompts,
            "--max-new-tokens",
            "4",
            "--raw",
            "--sequential",
        ],
    )
    assert code == 0, err
    assert "2 variants, one at a time (sequential runs were asked for)" in out
    assert out.count("Prompt: ") == 2 and "--- alpha (" in out and "--- beta (" in out and "--- base" not in out
    assert "Teacher-forced on alpha's continuation" in out


def test_compare_json_several_prompts(tiny_llama, llama_adapters, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fox\nhello world\n")
    code, out, err = run_in_process(
        capsys,
        [
            "compare",
            tiny_llama,
            "--adapter",
            f"alpha={llama_adapters['alpha']}",
            "--prompts-file",
            prompts,
            "--max-new-tokens",
            "3",
            "--json",
        ],
    )
    assert code == 0, err
    obj = json.loads(out)
    assert [p["prompt"] for p in obj["prompts"]] == ["fox", "hello world"] and obj["mixed_batch"] is True


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max new tokens is 0"),
        (["--prompt", "hi", "--max-new-tokens", "1000000"], "max new tokens is 1,000,000"),
        (["--prompt", "hi", "--adapter", "x=/nonexistent/adapter"], "/nonexistent/adapter does not exist"),
        (["--prompt", "hi", "--merged", "/nonexistent/merged"], "/nonexistent/merged does not exist"),
        ([], "no prompt given"),
        (["--prompt", "hi", "--no-base-variant"], "nothing to compare"),
        (["--prompt", "hi", "--reference", "zzz"], "--reference 'zzz' is not a variant"),
        (["--prompt", "hi", "--max-new-tokens", "lots"], "invalid int value"),
    ],
)
def test_bad_input_exit_2(tiny_llama, extra, needle, capsys):
    code, out, err = run_in_process(capsys, ["compare", tiny_llama, *extra])
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_prompts_files_exit_2(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    code, _, err = run_in_process(capsys, ["compare", tiny_llama, "--prompts-file", bad])
    assert code == 2 and "bad.jsonl line 2 is not JSON" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = run_in_process(capsys, ["compare", tiny_llama, "--prompts-file", empty])
    assert code == 2 and "empty.txt has no prompts" in err
    code, _, err = run_in_process(capsys, ["compare", tiny_llama, "--prompts-file", tmp_path / "missing.txt"])
    assert code == 2 and "missing.txt does not exist" in err


def test_mismatched_adapter_exit_2_in_a_subprocess(tiny_llama, wide_adapter):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_studio",
            "compare",
            str(tiny_llama),
            "--adapter",
            f"w={wide_adapter}",
            "--prompt",
            "hi",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    # one error line; a command that ran ten seconds first (a loaded machine) may have logged progress lines before
    # it, as on any non-terminal stderr (cli/common.stderr_progress)
    *before, error = proc.stderr.splitlines()
    assert error.startswith("lora-studio: error:") and "adapter expects in=64,out=64" in error
    assert all(" · " in line and line.endswith("%)") for line in before), before


def test_compare_and_evaluate_write_reports(tiny_llama, llama_adapters, tmp_path, capsys):
    adapters = ["--adapter", f"alpha={llama_adapters['alpha']}", "--adapter", f"beta={llama_adapters['beta']}"]
    page = tmp_path / "compare.html"
    argv = ["compare", tiny_llama, *adapters, "--prompt", "hello", "--max-new-tokens", "6", "--report", page]
    code, out, err = run_in_process(capsys, argv)
    assert code == 0, err
    assert f"report: {page}" in out
    text = page.read_text()
    assert "<!DOCTYPE html>" in text and "alpha" in text and "beta" in text and "sha256" in text
    assert str(llama_adapters["alpha"]) in text  # provenance: the adapter's folder and its hash
    code, _, err = run_in_process(capsys, argv)  # the report exists now
    assert code == 2 and "exists" in err and "--overwrite" in err
    code, _, err = run_in_process(capsys, [*argv[:-1], tmp_path / "compare.txt"])
    assert code == 2 and "unknown report type" in err

    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"prompt": "Say hello.", "completion": "Hello there."}) + "\n")
    markdown = tmp_path / "evaluation.md"
    code, out, err = run_in_process(
        capsys, ["evaluate", tiny_llama, *adapters, "--data", data, "--report", markdown, "--json"]
    )
    assert code == 0, err
    assert "# LoRA Studio evaluation" in markdown.read_text() and json.loads(out)["kind"] == "evaluation"
