"""Every file or folder a command writes stays apart from what it reads: a report over its data, prompts, adapter or
base, a training script over the base, the data or the working folder, a reduced adapter over its data. Each is
refused in one line before any work, and the input is left as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cli_helpers import run_in_process


def digest(path: Path) -> str:
    """The contents of a file, or of every file under a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def inputs(tmp_path, tiny_llama, llama_adapters):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "Say hi.", "completion": " Hi!"}, {"prompt": "Count.", "completion": " One."}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.txt").write_text("Hello\n")
    return {"base": Path(tiny_llama), "adapter": Path(llama_adapters["alpha"]), "data": data / "train.jsonl"}


def refused(capsys, argv, touched: Path, *words: str) -> None:
    before = digest(touched)
    code, out, err = run_in_process(capsys, argv)
    assert code == 2 and not out, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert digest(touched) == before


@pytest.mark.parametrize("target", ["data", "adapter_config", "base_config"])
def test_an_evaluation_report_never_replaces_what_it_reads(target, inputs, capsys):
    path = {
        "data": inputs["data"],
        "adapter_config": inputs["adapter"] / "adapter_config.json",
        "base_config": inputs["base"] / "config.json",
    }[target]
    argv = ["evaluate", inputs["base"], "--adapter", f"a={inputs['adapter']}", "--data", inputs["data"]]
    refused(capsys, [*argv, "--report", path, "--overwrite"], path.parent, "would")  # be replaced, or change


def test_a_comparison_report_never_replaces_its_prompts(inputs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    csv = tmp_path / "prompts.csv"
    prompts.rename(csv)  # a report type: the prompts file itself is the report asked for
    argv = ["compare", inputs["base"], "--adapter", f"a={inputs['adapter']}", "--prompts-file", csv]
    refused(capsys, [*argv, "--report", csv, "--overwrite"], csv, "prompts file")


@pytest.mark.parametrize("target", ["base", "data folder", "working folder", "empty"])
def test_a_training_script_never_replaces_the_base_the_data_or_the_working_folder(
    target, inputs, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    folder = {
        "base": str(inputs["base"]),
        "data folder": str(inputs["data"].parent),
        "working folder": ".",
        "empty": "",
    }[target]
    argv = ["train", inputs["base"], "--data", inputs["data"], "--out", tmp_path / "run", "--max-steps", "1"]
    touched = inputs["data"].parent if target != "base" else inputs["base"]
    words = ("empty",) if target == "empty" else ()
    refused(capsys, [*argv, "--export-script", folder, "--overwrite"], touched, *words)
    assert not (tmp_path / "run").exists()


def test_a_reduced_adapter_never_replaces_its_data(inputs, capsys):
    argv = ["reduce", inputs["adapter"], "--rank", "2", "--data", inputs["data"], "--base", inputs["base"]]
    refused(capsys, [*argv, "--out", inputs["data"].parent, "--overwrite"], inputs["data"].parent, "data file")


@pytest.mark.parametrize("command", ["merge", "train", "reduce", "evaluate", "compare"])
def test_a_new_output_inside_an_input_folder_is_refused(command, inputs, capsys):
    """Not only replacing: a new name inside the adapter or base folder changes that folder too."""
    base, adapter, data = inputs["base"], inputs["adapter"], inputs["data"]
    argv, touched = {
        "merge": (["merge", base, "--adapter", adapter, "--out", adapter / "merged"], adapter),
        "train": (["train", base, "--data", data, "--max-steps", "1", "--out", base / "run"], base),
        "reduce": (["reduce", adapter, "--rank", "2", "--out", adapter / "r2"], adapter),
        "evaluate": (
            ["evaluate", base, "--adapter", f"a={adapter}", "--data", data, "--report", adapter / "r.jsonl"],
            adapter,
        ),
        "compare": (
            ["compare", base, "--adapter", f"a={adapter}", "--prompt", "hi", "--report", base / "r.md"],
            base,
        ),
    }[command]
    refused(capsys, argv, touched, "inside the")
    assert not any(p.name in ("merged", "run", "run.checkpoints", "r2", "r.jsonl", "r.md") for p in touched.iterdir())


def test_replacing_an_output_that_is_a_link_leaves_no_temporary(inputs, tmp_path, capsys):
    from cli_helpers import run_in_process as run

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    code, _out, err = run(capsys, ["reduce", inputs["adapter"], "--rank", "2", "--out", link, "--overwrite"])
    assert code == 0, err
    assert (link / "adapter_config.json").is_file() and not link.is_symlink() and real.is_dir()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden partial left


def test_an_output_beside_a_gguf_base_is_not_inside_it(tmp_path, capsys):
    """A GGUF base is its file: an adapter saved in the folder that holds it is apart from it."""
    gguf = tmp_path / "models" / "base.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 64)  # refused later, when it is read, not as the output's container
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    argv = ["train", gguf, "--data", data, "--max-steps", "1", "--out", gguf.parent / "adapter"]
    code, _out, err = run_in_process(capsys, argv)
    assert code == 2 and "inside" not in err, err
