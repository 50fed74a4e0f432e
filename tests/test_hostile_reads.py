"""Readers under hostile input: a pipe or a device where a file should be, a saved dataset that names files outside
its folder, a row of tens of megabytes, a scale range of a billion points. Each is one line (exit 2 in the CLI),
before anything blocks, reads without end or builds what it was told to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import run_in_process

from lora_studio.core.errors import UserError
from lora_studio.core.train.data import MAX_ROW_CHARS, read_rows

pytestmark = pytest.mark.timeout(120)  # a hang fails here instead of stalling the suite
ROWS = [{"prompt": "Say hi.", "completion": " Hi!"}, {"prompt": "Count.", "completion": " One."}]


def one_line(code, out, err, *words):
    assert code == 2 and not out, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def write_rows(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "data.jsonl"
    os.mkfifo(path)
    return path


def test_a_pipe_or_a_device_as_data_is_refused_without_blocking(fifo, tmp_path):
    with pytest.raises(UserError, match="not a regular file"):
        read_rows(fifo)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    with pytest.raises(UserError, match="not a regular file"):
        read_rows(zero)


def test_the_cli_refuses_a_pipe_for_training_validation_evaluation_and_gguf_data(
    fifo, tmp_path, tiny_llama, llama_adapters, capsys
):
    data = write_rows(tmp_path / "ok.jsonl")
    val = tmp_path / "val.csv"
    os.mkfifo(val)
    train = ["train", tiny_llama, "--out", tmp_path / "run", "--max-steps", "1"]
    one_line(*run_in_process(capsys, [*train, "--data", fifo]), "not a regular file")
    one_line(*run_in_process(capsys, [*train, "--data", data, "--val", val]), "not a regular file")
    evaluate = ["evaluate", tiny_llama, "--adapter", f"a={llama_adapters['alpha']}"]
    one_line(*run_in_process(capsys, [*evaluate, "--data", fifo]), "not a regular file")
    gguf = tmp_path / "variant.gguf"
    os.mkfifo(gguf)
    one_line(*run_in_process(capsys, [*evaluate, "--data", data, "--gguf", f"g={gguf}"]), "not a regular file")
    assert not (tmp_path / "run").exists()


def saved_dataset(folder: Path) -> Path:
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("how", ["parent", "absolute", "link"])
def test_a_saved_dataset_never_reads_a_file_outside_its_folder(how, tmp_path):
    folder = saved_dataset(tmp_path / "saved")
    outside = saved_dataset(tmp_path / "elsewhere")
    state = json.loads((folder / "state.json").read_text())
    arrow = folder / state["_data_files"][0]["filename"]
    foreign = outside / json.loads((outside / "state.json").read_text())["_data_files"][0]["filename"]
    if how == "link":
        arrow.unlink()
        arrow.symlink_to(foreign)
    else:
        name = f"../elsewhere/{foreign.name}" if how == "parent" else str(foreign)
        state["_data_files"][0]["filename"] = name
        (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="points outside the folder"):
        read_rows(folder)


def test_a_pipe_as_a_saved_datasets_arrow_file_is_refused(tmp_path):
    folder = saved_dataset(tmp_path / "saved")
    arrow = folder / json.loads((folder / "state.json").read_text())["_data_files"][0]["filename"]
    arrow.unlink()
    os.mkfifo(arrow)
    with pytest.raises(UserError, match="not a regular file"):
        read_rows(folder)


def test_a_row_of_megabytes_is_refused_before_tokenising(tmp_path):
    path = write_rows(tmp_path / "big.jsonl", [*ROWS, {"prompt": "x" * (MAX_ROW_CHARS + 1), "completion": "y"}])
    with pytest.raises(UserError, match=r"row 3: 1,000,002 characters"):
        read_rows(path)


def test_a_scale_range_is_counted_before_it_is_built(tiny_llama, llama_adapters, tmp_path, capsys):
    data = write_rows(tmp_path / "ok.jsonl")
    argv = ["evaluate", tiny_llama, "--adapter", f"a={llama_adapters['alpha']}", "--data", data, "--sweep", "a"]
    one_line(*run_in_process(capsys, [*argv, "--scales", "0:1:1e-9"]), "1,000,000,001 scales")
    one_line(*run_in_process(capsys, [*argv, "--scales", "0:4:1e-320"]), "not a range")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--seed", "-1"], "seed -1 must be"),
        (["--seed", str(2**40)], "must be a whole number"),
        (["--device", "cuda:0"], "no CUDA device"),
    ],
)
def test_training_settings_out_of_range_are_one_line(extra, words, tiny_llama, tmp_path, capsys):
    if "cuda:0" in extra:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    data = write_rows(tmp_path / "ok.jsonl")
    argv = ["train", tiny_llama, "--data", data, "--out", tmp_path / "run", "--max-steps", "1", *extra]
    one_line(*run_in_process(capsys, argv), words)


def test_text_no_tokenizer_can_hold_and_json_nested_too_deep_are_one_line(tiny_llama, llama_adapters, tmp_path, capsys):
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "x\\ud800", "completion": "y"}\n')
    with pytest.raises(UserError, match="lone UTF-16 surrogate"):
        read_rows(surrogate)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match="nested too deep"):
        read_rows(deep)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    argv = ["compare", tiny_llama, "--adapter", f"a={llama_adapters['alpha']}", "--prompts-file", prompts]
    one_line(*run_in_process(capsys, argv), "nested too deep")


def test_an_output_under_a_regular_file_is_one_line(tiny_llama, tmp_path, capsys):
    data = write_rows(tmp_path / "ok.jsonl")
    (tmp_path / "afile").write_text("x")
    argv = ["train", tiny_llama, "--data", data, "--out", tmp_path / "afile" / "run", "--max-steps", "1"]
    one_line(*run_in_process(capsys, argv), "is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_an_evaluation_row_longer_than_the_models_positions_is_cut_at_them(tiny_gpt2, gpt2_adapter, tmp_path, capsys):
    data = write_rows(tmp_path / "long.jsonl", [{"prompt": "a b " * 20, "completion": " c d" * 200}, *ROWS])
    argv = ["evaluate", tiny_gpt2, "--adapter", f"g={gpt2_adapter}", "--data", data, "--json"]
    code, out, err = run_in_process(capsys, argv)
    assert code == 0, err  # GPT-2's 128 positions, not 1024: the row is cut where the model ends
    assert "longer than 128 tokens" in out + err


def test_a_corrupt_parquet_file_is_our_line_alone(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + b"garbage" * 3 + b"PAR1")
    argv = ["train", tiny_llama, "--data", bad, "--out", tmp_path / "run", "--max-steps", "1"]
    one_line(*run_in_process(capsys, argv), "cannot read it as PARQUET")


@pytest.mark.parametrize("targets", ["attention", "c_attn"])
def test_gpt2s_conv1d_attention_is_a_target(targets, tiny_gpt2, tmp_path, capsys):
    data = write_rows(tmp_path / "ok.jsonl")
    argv = ["train", tiny_gpt2, "--data", data, "--out", tmp_path / "run", "--max-steps", "1", "--targets", targets]
    code, _out, err = run_in_process(capsys, [*argv, "--json"])
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert "c_attn" in config["target_modules"] and config["fan_in_fan_out"]


@pytest.mark.parametrize(
    ("key", "value"), [("num_hidden_layers", 10**12), ("hidden_size", -32), ("vocab_size", 0), ("n_positions", "8")]
)
def test_a_config_of_impossible_sizes_is_one_line_before_anything_is_built(key, value, tiny_llama, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, key: value}))
    one_line(*run_in_process(capsys, ["inspect", base]), f"{key} is")


def test_compare_settings_and_outputs_the_system_refuses_are_one_line(tiny_llama, llama_adapters, tmp_path, capsys):
    argv = ["compare", tiny_llama, "--adapter", f"a={llama_adapters['alpha']}", "--prompt", "hi"]
    argv += ["--max-new-tokens", "2"]
    one_line(*run_in_process(capsys, [*argv, "--seed", str(10**23)]), "seed")
    one_line(*run_in_process(capsys, [*argv, "--report", "/proc/self/r.md"]), "cannot write in /proc/self")
    one_line(*run_in_process(capsys, [*argv, "--report", tmp_path / ("x" * 250 + ".md")]), "bytes long")
    one_line(*run_in_process(capsys, [*argv, "--max-memory", "cpu=1B"]), "no room")
    one_line(*run_in_process(capsys, [*argv, "--quantize", "nf4"]), "not a multiple of bitsandbytes' 4-bit block")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for file in Path(tiny_llama).iterdir():
        if file.suffix != ".safetensors":
            (garbage / file.name).write_bytes(file.read_bytes())
    (garbage / "model.safetensors").write_bytes(os.urandom(100))
    one_line(*run_in_process(capsys, [*argv, "--merged", f"m={garbage}"]), "cannot load garbage")


def test_a_pipe_as_an_adapter_folder_is_one_line(tiny_llama, tmp_path, capsys):
    pipe = tmp_path / "adapter"
    os.mkfifo(pipe)
    for argv in (
        ["inspect", tiny_llama, "--adapter", pipe],
        ["merge", tiny_llama, "--adapter", pipe, "--out", tmp_path / "m"],
        ["reduce", pipe, "--rank", "1", "--out", tmp_path / "r"],
    ):
        one_line(*run_in_process(capsys, argv), "not a folder")


def test_training_bounds_are_checked_before_any_step(tiny_llama, tmp_path, capsys):
    data = write_rows(tmp_path / "ok.jsonl")
    argv = ["train", tiny_llama, "--data", data, "--out", tmp_path / "run"]
    one_line(*run_in_process(capsys, [*argv, "--max-steps", str(10**12)]), "more than 1,000,000")
    one_line(*run_in_process(capsys, [*argv, "--epochs", "1e9"]), "optimiser steps")
    one_line(*run_in_process(capsys, [*argv, "--max-steps", "1", "--r", "100000"]), "from 1 to 65536")
    # tiny-llama's widest layer holds rank 32 at most (its hidden size)
    one_line(*run_in_process(capsys, [*argv, "--max-steps", "1", "--r", "64"]), "more than any targeted layer")
    one_line(*run_in_process(capsys, [*argv, "--max-steps", "1", "--targets", "q_proj,,v_proj"]), "empty item")
    (tmp_path / "existing.md").write_text("x")
    argv[-1] = tmp_path / "existing.md"
    one_line(*run_in_process(capsys, [*argv, "--max-steps", "1", "--overwrite"]), "is not a folder")
    assert not (tmp_path / "existing.md.checkpoints").exists() and not (tmp_path / "run.checkpoints").exists()


def test_a_gguf_that_is_not_one_is_refused_before_the_work(gguf_llama, gguf_llama_adapters, tmp_path, capsys):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf" * 10)
    adapter = next(iter(gguf_llama_adapters.values()))
    argv = ["export", gguf_llama, "--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "a.gguf"]
    one_line(*run_in_process(capsys, [*argv, "--base-gguf", garbage]), "not a GGUF file")
    one_line(*run_in_process(capsys, [*argv, "--base-gguf", tmp_path]), "is a folder")
    assert not (tmp_path / "a.gguf").exists()


def test_options_a_command_would_ignore_and_values_out_of_range_are_one_line(
    tiny_llama, llama_adapters, tmp_path, capsys
):
    alpha, beta = llama_adapters["alpha"], llama_adapters["beta"]
    data = write_rows(tmp_path / "ok.jsonl")
    evaluate = ["evaluate", tiny_llama, "--adapter", f"a={alpha}", "--data", data]
    one_line(*run_in_process(capsys, [*evaluate, "--scales", "0,1"]), "--sweep")
    one_line(*run_in_process(capsys, [*evaluate, "--combine", "mix=a:1,a:1"]), "named twice")
    one_line(*run_in_process(capsys, [*evaluate, "--report", ""]), "--report is empty")
    (tmp_path / "folder.md").mkdir()
    one_line(*run_in_process(capsys, [*evaluate, "--report", tmp_path / "folder.md", "--overwrite"]), "is a folder")
    one_line(*run_in_process(capsys, [*evaluate, "--gguf", f"g={tmp_path}"]), "is a folder")
    one_line(*run_in_process(capsys, ["reduce", alpha, "--plan", "--out", tmp_path / "r"]), "writes nothing")
    one_line(*run_in_process(capsys, ["reduce", alpha, "--rank", "1", "--data", data]), "--base")
    merge = ["merge", tiny_llama, "--adapter", alpha, "--adapter", beta, "--combination", "linear"]
    one_line(*run_in_process(capsys, [*merge, "--weights", "1,,2", "--out", tmp_path / "m"]), "empty item")
    one_line(*run_in_process(capsys, [*merge, "--weights", "1e30,1", "--out", tmp_path / "m"]), "outside -4 to 4")
    compare = ["compare", tiny_llama, "--adapter", f"a={alpha}", "--prompt", "hi", "--sample"]
    one_line(*run_in_process(capsys, [*compare, "--temperature", "inf"]), "temperature")
    one_line(*run_in_process(capsys, ["inspect", tiny_llama, "--device-map", "cuda:-1"]), "unknown device map")
    one_line(*run_in_process(capsys, ["inspect", tiny_llama, "--max-memory", "cuda:9=1GB"]), "cuda:9")
    one_line(*run_in_process(capsys, ["merge", tiny_llama, "--adapter", alpha]), "lora-studio: error: the following")


def test_lora_factors_stored_as_whole_numbers_are_refused(tiny_llama, llama_adapters, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "ints"
    shutil.copytree(llama_adapters["alpha"], adapter)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v.to(dtype=__import__("torch").int32) for k, v in load_file(weights).items()}, weights)
    one_line(*run_in_process(capsys, ["inspect", tiny_llama, "--adapter", adapter]), "not as 16, 32 or")


def test_accelerates_placement_chatter_stays_in_the_log(tiny_llama, llama_adapters, tmp_path, capsys):
    data = write_rows(tmp_path / "ok.jsonl")
    argv = ["evaluate", tiny_llama, "--adapter", f"a={llama_adapters['alpha']}", "--data", data]
    one_line(*run_in_process(capsys, [*argv, "--max-memory", "cpu=1B"]), "no room")


def test_a_reduction_measured_on_a_wrong_base_writes_nothing(tiny_gpt2, llama_adapters, tmp_path, capsys):
    data = write_rows(tmp_path / "ok.jsonl")
    argv = ["reduce", llama_adapters["alpha"], "--rank", "1", "--base", tiny_gpt2, "--data", data]
    one_line(*run_in_process(capsys, [*argv, "--out", tmp_path / "r"]))
    assert not (tmp_path / "r").exists()  # the base is checked before the reduced adapter is written


def test_what_the_system_refuses_of_a_path_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    one_line(*run_in_process(capsys, ["inspect", tmp_path / ("b" * 300)]), "too long for the file system")
    deep = tmp_path.joinpath(*["c" * 200] * 25)  # short parts, over 4096 bytes in all
    argv = ["merge", tiny_llama, "--adapter", tmp_path, "--out", deep]
    code, _out, err = run_in_process(capsys, argv)
    assert code == 2 and "internal error" not in err, err
    from lora_studio.cli.main import main

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    assert main([]) == 2 and "no display" in capsys.readouterr().err  # not Qt's abort


def test_a_chat_template_asking_for_a_huge_range_is_one_line(tiny_llama, tmp_path):
    from lora_studio.core.generation.chat_template import apply_chat_template
    from lora_studio.core.model.loading import load_tokenizer
    from lora_studio.core.model.sources import resolve_source

    tokenizer = load_tokenizer(resolve_source(tiny_llama))
    tokenizer.chat_template = "{% for i in range(100000000) %}x{% endfor %}"
    with pytest.raises(UserError, match="chat template"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}], tokenize=False)


def test_whole_weights_an_adapter_does_not_declare_are_said(tiny_llama, llama_adapters, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "extra"
    shutil.copytree(llama_adapters["alpha"], adapter)
    weights = adapter / "adapter_model.safetensors"
    base = load_file(next(Path(tiny_llama).glob("*.safetensors")))
    head = base.get("lm_head.weight", base["model.embed_tokens.weight"])
    save_file({**load_file(weights), "base_model.model.lm_head.weight": torch.zeros_like(head)}, weights)
    code, out, err = run_in_process(capsys, ["inspect", tiny_llama, "--adapter", adapter, "--json"])
    assert code == 0, err
    warnings = json.loads(out)["adapters"][0]["warnings"]
    assert any("lm_head.weight" in w and "replace the base's" in w for w in warnings), warnings


def test_a_base_with_nan_weights_is_one_line(tiny_llama, llama_adapters, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "nan-base"
    shutil.copytree(tiny_llama, base)
    weights = next(base.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    argv = ["compare", base, "--adapter", f"a={llama_adapters['alpha']}", "--prompt", "hi", "--max-new-tokens", "2"]
    one_line(*run_in_process(capsys, argv), "NaN/Inf")
